//! The domain: what a request means and what to do about it.

pub mod controller;
pub mod locks;
pub mod node;
pub mod token;
pub mod work;
