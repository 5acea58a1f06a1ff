//! Builds cache-ebpf for the BPF target and embeds it (aya-build, as aya's template does).
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = std::path::Path::new(&manifest)
        .join("../cache-ebpf")
        .canonicalize()?;
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    println!("cargo:rerun-if-changed=../cache-common/src");
    aya_build::build_ebpf(
        [Package {
            name: "cache-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
