//! Token hashing (helper in progress).
