//! The logic of `kvindex replay` (in progress).
