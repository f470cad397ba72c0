//! The CSI conformance suite, written once and run by one test target per
//! backend (`conformance_loop`, `conformance_lvm`).

mod cancellation;
mod concurrency;
mod controller;
mod deadlines;
mod foreign_mounts;
mod group_snapshots;
mod io_limits;
mod node;
mod restart;
mod snapshots;
