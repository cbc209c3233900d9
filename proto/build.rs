//! Generates the tonic code for `cairn.v1` with the vendored protoc, so a
//! fresh machine needs no system protoc and the build never touches the
//! network.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: a build script is single-threaded; nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Chunk bytes between peers stay in reference-counted buffers
        // instead of being copied into a `Vec` per message.
        .bytes(".cairn.v1.PeerPutChunkRequest.data")
        .bytes(".cairn.v1.PeerGetChunkResponse.data")
        .file_descriptor_set_path(out_dir.join("cairn_v1_descriptor.bin"))
        .compile_protos(&["cairn/v1/cairn.proto"], &["."])?;
    println!("cargo:rerun-if-changed=cairn/v1/cairn.proto");
    Ok(())
}
