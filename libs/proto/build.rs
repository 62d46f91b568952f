//! Generates the Rust types, clients and servers of every `.proto` under
//! `proto/`, with a vendored `protoc` so no system install is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the
    // environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let files = [
        "o2c/common/v1/money.proto",
        "o2c/customer/v1/customer.proto",
        "o2c/credit/v1/credit.proto",
        "o2c/invoicing/v1/invoicing.proto",
        "o2c/payments/v1/payments.proto",
        "o2c/crm_sync/v1/crm_sync.proto",
        "o2c/gateway/v1/gateway.proto",
        "o2c/gateway/v1/admin.proto",
        "o2c/events/v1/events.proto",
    ];
    let paths: Vec<PathBuf> = files.iter().map(|f| root.join(f)).collect();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("o2c_descriptor.bin"))
        .compile_protos(&paths, std::slice::from_ref(&root))?;
    println!("cargo:rerun-if-changed={}", root.display());
    for path in &paths {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    Ok(())
}
