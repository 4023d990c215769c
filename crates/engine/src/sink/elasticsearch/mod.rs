//! Elasticsearch / OpenSearch sink: request encoding, response classification, the client.

pub mod client;
pub mod request;
pub mod response;

pub use client::{Elastic, Error, ServerInfo};
