//! The CSI conformance suite (`tests/conformance/`) against the loop
//! backend, or against the backend `KENNEL_TEST_BACKEND` names.

mod common;
mod conformance;
#[path = "conformance/loop_images.rs"]
mod loop_images;

/// Not pinned: `KENNEL_TEST_BACKEND` decides, the loop backend by default.
const FIXED_BACKEND: Option<common::Backend> = None;
