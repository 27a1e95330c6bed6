// protoc comes from the protoc-bin-vendored crate so that a fresh machine
// needs nothing installed beyond the Rust toolchain.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    println!("cargo:rerun-if-changed=proto/piehole.proto");
    tonic_prost_build::configure().compile_protos(&["proto/piehole.proto"], &["proto"])?;
    Ok(())
}
