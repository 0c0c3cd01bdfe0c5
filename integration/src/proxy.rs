//! The cuttable, slowable TCP proxy lives in `strata-core` (drills and `strata demo` use it
//! too); re-exported here for the tests.
pub use strata_core::proxy::*;
