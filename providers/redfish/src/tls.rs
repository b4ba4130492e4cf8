//! TLS trust for this driver's endpoints: pcg-provider's shared CA-or-pin configuration.

pub use pcg_provider::tls::{cert_sha256, client_config, parse_pin, trust_failure};
