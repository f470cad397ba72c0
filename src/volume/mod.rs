//! The domain: what a request means and what to do about it.

pub mod controller_ops;
pub mod locks;
pub mod node_ops;
pub mod readers;
pub mod token;
pub mod work;
