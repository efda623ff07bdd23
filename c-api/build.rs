//! Gives the shared library a versioned soname, so programs linked against one ABI never load a
//! library with another.

/// Must equal `KVFERRY_ABI_VERSION` (a unit test checks).
const ABI_VERSION: u32 = 1;

fn main() {
    let soname = format!("libkvferry.so.{ABI_VERSION}");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{soname}");
    }
    println!("cargo:rustc-env=KVFERRY_SONAME={soname}");
}
