//! The CSI conformance suite (`tests/conformance/`) against
//! `--backend lvm`: every test gets its own throwaway volume group. Tests
//! that only make sense for loop images say so and skip.

mod common;
mod conformance;

const FIXED_BACKEND: Option<common::Backend> = Some(common::Backend::Lvm);
