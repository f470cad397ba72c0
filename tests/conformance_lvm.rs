//! The CSI conformance suite (`tests/conformance/`) against
//! `--backend lvm`: every test gets its own throwaway volume group. Tests
//! that only make sense for loop images live in `conformance/loop_images.rs`,
//! which only the loop target includes.

mod common;
mod conformance;

const FIXED_BACKEND: Option<common::Backend> = Some(common::Backend::Lvm);
