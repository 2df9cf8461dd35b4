//! End-to-end tests with real processes live here once the drivers exist (issue 3).
