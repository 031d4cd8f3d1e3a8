//! Decoding (helper in progress).
