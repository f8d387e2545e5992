//! Services between the HTTP handlers and the registry, trainer and stores: what a resource is
//! and what may be done with it, whatever protocol asks. Handlers parse, call a service and
//! map its answer; services know nothing of HTTP.

pub mod adapters;
pub mod feedback;
