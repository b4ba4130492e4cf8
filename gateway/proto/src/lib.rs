//! The pcg contract between gateway and SaaS: the tunnel's protobuf messages and `Broker` gRPC
//! service (generated from `proto/pcg/tunnel/v1/tunnel.proto`), a tenant's `Feed` service
//! (`proto/pcg/feed/v1/feed.proto`), the pairing token format, the JSON bodies of the pairing
//! exchange, the documents of declared machines and the watch loop ([`machines`]), and secrets
//! sealed to a gateway's key. Both sides depend on this crate and nothing else of each other.

/// The code generated from the `.proto` files, with the lints it does not meet allowed once.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    missing_docs,
    unreachable_pub
)]
mod generated {
    pub mod tunnel {
        pub mod v1 {
            tonic::include_proto!("pcg.tunnel.v1");
        }
    }

    /// A tenant's feed as a gRPC server stream (`proto/pcg/feed/v1/feed.proto`).
    pub mod feed {
        pub mod v1 {
            tonic::include_proto!("pcg.feed.v1");
        }
    }
}

pub use generated::{feed, tunnel};

pub mod codec;
pub mod machines;
pub mod pairing;
pub mod sealed;
pub mod ws;

pub use tunnel::v1;

/// What a SaaS listener writes, in place of a TLS record, to a connection it cannot take now,
/// followed by the number of milliseconds to wait and `\r\n`; then it closes the connection. A
/// gateway seeing it backs off that long (it is not a sign of a broken path).
pub const BUSY_PREFIX: &str = "PCG-BUSY retry-after-ms=";

/// gRPC metadata key with which the broker asks a refused gateway to wait (milliseconds).
pub const RETRY_AFTER_MS: &str = "retry-after-ms";
