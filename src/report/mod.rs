//! Comparison reports (see issue 5).
