//! Embeds libtorch's directory as the runtime search path, so `target/release/agora` runs with no
//! environment set. With AGORA_CUDA=1 it also keeps libtorch_cuda linked (the linker would otherwise
//! drop it, since no symbol of it is referenced directly, and CUDA would silently be unavailable).
fn main() {
    println!("cargo:rerun-if-env-changed=AGORA_CUDA");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        if std::env::var("AGORA_CUDA").as_deref() == Ok("1")
            && std::path::Path::new(&lib).join("libtorch_cuda.so").exists()
        {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
