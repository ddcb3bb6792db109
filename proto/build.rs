//! Generates the messenger.v1 types and tonic stubs, plus the encoded file
//! descriptor set that gRPC reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "messenger/v1/common.proto",
        "messenger/v1/gateway.proto",
        "messenger/v1/gateway_internal.proto",
        "messenger/v1/message.proto",
        "messenger/v1/presence.proto",
        "messenger/v1/media.proto",
        "messenger/v1/notify.proto",
    ];
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // `build_transport(false)`: the generated `connect(dst)` constructor would clash
    // with the `Connect` rpc; clients are built from a `Channel` instead.
    tonic_prost_build::configure()
        .build_transport(false)
        .codec_path("crate::codec::LeanCodec")
        .file_descriptor_set_path(out_dir.join("messenger_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
