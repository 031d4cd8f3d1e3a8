//! loom models of kvindex lock-free protocols (see the loom issue). Not implemented yet.
