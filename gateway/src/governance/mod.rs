//! What the gateway shows operators, auditors and residents about itself: the audit log, the
//! footprint meter and the transparency register.

pub mod audit;
pub mod footprint;
pub mod register;
