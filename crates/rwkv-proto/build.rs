//! Generates the gRPC code from `proto/` with a vendored `protoc`, so no system package is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through this variable; a build script is single-threaded.
    std::env::set_var("PROTOC", protoc);
    // Read at run time, not with `env!`: the compiled build script is shared by checkouts of the
    // same package in other directories (worktrees using one target dir).
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir).join("../../proto");
    let files = [
        root.join("rwkv/worker/v1/worker.proto"),
        root.join("rwkv/api/v1/api.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    tonic_prost_build::configure().compile_protos(&files, &[root])?;
    Ok(())
}
