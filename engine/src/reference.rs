//! Reference model (helper in progress).
