//! Compiles the .proto files of this folder with a pure-Rust protobuf compiler: no protoc, no
//! network, no git.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=csi.proto");
    let fds = protox::compile(["csi.proto"], ["."])?;
    tonic_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
