//! The service kit every O2C service is built with.
//!
//! # Layout
//! - [`settings`]: layered settings (defaults → optional TOML file → `O2C_*`
//!   environment variables), validated once at start.
//! - [`serve`]: one gRPC server per service with health, reflection, trace
//!   context extraction and graceful shutdown.
//! - [`shutdown`]: SIGTERM / Ctrl-C as a future.
//! - [`telemetry`]: `tracing` subscriber with an optional OTLP exporter.
//! - [`error`]: the one mapping from errors to `tonic::Status`.
//! - [`db`]: database connection (SQLite or PostgreSQL) and migrations.
//! - [`idempotency`]: replayable mutations keyed by idempotency key.
//! - [`outbox`]: transactional outbox, relay and consumer inbox.
//! - [`cache`]: optional Redis connection.
//! - [`standalone`]: the `main` of every single-service binary.
//! - [`client`]: channels to other services, with deadlines and trace
//!   propagation.
//!
//! Business rules of any one service never live here.

pub mod auth;
pub mod background;
pub mod cache;
pub mod client;
pub mod clock;
pub mod db;
pub mod error;
pub mod fields;
pub mod idempotency;
pub mod metrics;
pub mod outbox;
pub mod proto_money;
pub mod serve;
pub mod settings;
pub mod shutdown;
pub mod standalone;
pub mod telemetry;

pub use error::{ApiError, FieldViolation};
