// `testd` on mio: the `mio_kv` example of handoff-io-mio, for the end-to-end suite.
include!("../../../handoff-io-mio/examples/mio_kv.rs");
