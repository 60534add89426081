//! # The kvant quantization-method contract
//!
//! A quantization method for kvant is a Rust type implementing [`QuantMethod`], compiled as a
//! `cdylib` and exported with [`export_plugin!`]. The host (`kvant`) loads the library at run
//! time, checks that it speaks a compatible contract version, and drives the method through the
//! Hugging Face `HfQuantizer` lifecycle. Nothing in the trait is FFI: the types that cross the
//! library boundary live in [`ffi`], which authors never need.
//!
//! ```ignore
//! use kvant_plugin_api::*;
//!
//! struct MyMethod;
//! impl QuantMethod for MyMethod { /* ... */ }
//!
//! export_plugin!(MyMethod);
//! ```
//!
//! `plugins/rtn` in the kvant repository is a complete, short example.

pub mod config;
pub mod dense;
pub mod ffi;
pub mod method;
mod runtime;
pub mod tensor;

pub use config::{Config, ConfigProblem, OptionKind, OptionSpec};
pub use method::{
    Environment, Flags, MethodInfo, Module, ModuleKind, ModulePlan, ModuleTensors, NoCalibration, Observer, Plan,
    QuantMethod, Quantized, Result, Skeleton, Summary, DEFAULT_FORWARD_TOLERANCE,
};
pub use runtime::{progress, threads};
pub use tensor::{DType, Tensor, TensorSpec, TensorView};

/// Version of the contract this crate defines. A plugin is loadable by a host with the same
/// major version; minor releases only append (see the compatibility policy in the README).
///
/// 1.1: [`Plan::fold_input_scales`] and [`QuantMethod::quantize_group`] (the `quantize_group`
/// entry appended to the method vtable).
///
/// 1.2: [`TensorSpec::variable_length`], [`MethodInfo::forward_tolerance`] and
/// [`MethodInfo::read_only`]: JSON fields with defaults, the method vtable unchanged.
pub const CONTRACT_VERSION: &str = "1.2.0";

/// The oldest contract of this major whose plugins a host of [`CONTRACT_VERSION`] loads: the
/// wire types have not changed since 1.1 (1.2 only added JSON fields with defaults), so
/// plugins built against 1.1 keep working. An older minor lacks method-table entries, which
/// abi_stable's layout check refuses.
pub const OLDEST_LOADABLE_CONTRACT: &str = "1.1.0";

/// An error a plugin reports to the host: a message meant for the user. Name the module,
/// tensor or option at fault; the host adds the method and file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl Error {
    /// An error with this message.
    pub fn new(msg: impl Into<String>) -> Self {
        Error(msg.into())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// Re-exports the macro's expansion needs, so plugins depend on `kvant-plugin-api` alone.
#[doc(hidden)]
pub mod __private {
    pub use abi_stable::library::{LibHeader, __call_root_module_loader, CheckTypeLayout, RootModuleResult};
    pub use abi_stable::std_types::{RResult, RString, RVec};
}

/// Exports one or more methods from a plugin library:
/// `export_plugin!(Nf4::new(), Fp4::new(), Int8::new());`.
///
/// Use it once, at the root of a crate built with `crate-type = ["cdylib"]`. The expressions
/// run when the host loads the library; a panic there is reported, not a crash.
#[macro_export]
macro_rules! export_plugin {
    ($($method:expr),+ $(,)?) => {
        #[doc(hidden)]
        pub extern "C" fn __kvant_methods() -> $crate::__private::RResult<
            $crate::__private::RVec<$crate::ffi::FfiMethodBox>,
            $crate::__private::RString,
        > {
            $crate::ffi::build_methods(|| ::std::vec![$($crate::ffi::method_box($method)),+])
        }

        #[doc(hidden)]
        pub fn __kvant_root_module() -> $crate::ffi::PluginModRef {
            $crate::ffi::root_module(__kvant_methods)
        }

        // The name abi_stable's loader looks up (`abi_stable::library::ROOT_MODULE_LOADER_NAME`;
        // a test in kvant-plugin-api keeps the two equal).
        #[doc(hidden)]
        #[no_mangle]
        pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::__private::LibHeader = {
            extern "C" fn load() -> $crate::__private::RootModuleResult {
                $crate::__private::__call_root_module_loader(__kvant_root_module)
            }
            unsafe {
                $crate::__private::LibHeader::from_constructor::<$crate::ffi::PluginModRef>(
                    load,
                    $crate::__private::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn export_symbol_is_abi_stables_loader_name() {
        assert_eq!(abi_stable::library::ROOT_MODULE_LOADER_NAME, "_1as_0lib_1header_0root_bmodule_bloader");
    }
}
