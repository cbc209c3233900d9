//! Generates the tonic code for `csi.v1` with the vendored protoc, so a fresh
//! machine needs no system protoc and the build never touches the network.
//! The protoc path goes through prost-build's config rather than the
//! environment, so the script needs no `unsafe`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure().compile_with_config(
        config,
        &[std::path::PathBuf::from("proto/csi.proto")],
        &[std::path::PathBuf::from("proto"), well_known],
    )?;
    println!("cargo:rerun-if-changed=proto/csi.proto");
    Ok(())
}
