//! Elasticsearch / OpenSearch sink: request encoding, response classification, the client
//! (and its AWS SigV4 signing).

pub mod aws;
pub mod client;
pub mod request;
pub mod response;

pub use client::{Elastic, Error, ServerInfo};
