//! Generates the Rust code for `proto/pcg/tunnel/v1/tunnel.proto` and `proto/pcg/feed/v1/feed.proto`
//! with the vendored `protoc`,
//! so a build needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded, so setting the variable races nothing.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Small per-stream buffers (see src/codec.rs).
        .codec_path("crate::codec::TunnelCodec")
        .compile_protos(
            &[
                "proto/pcg/tunnel/v1/tunnel.proto",
                "proto/pcg/feed/v1/feed.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
