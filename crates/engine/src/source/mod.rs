//! Sources of changes. One today: MongoDB.

pub mod mongodb;
