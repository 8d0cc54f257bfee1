//! Cross-component tests live in this package's test targets (`ztunnel_xds.rs`, ...);
//! the library is empty.
