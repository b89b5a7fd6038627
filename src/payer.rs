//! Who pays (SPEC §6), as pure functions: no I/O, no locks.

/// Payers, in the order of the usage report's `units` object.
pub const PAYERS: [&str; 5] = ["prepaid_qps", "single_package", "general_package", "payg", "free_default"];

/// The payers of SPEC §6, indexed like [`PAYERS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum PayerKind {
    PrepaidQps = 0,
    SinglePackage = 1,
    GeneralPackage = 2,
    Payg = 3,
    FreeDefault = 4,
}

impl PayerKind {
    pub const ALL: [PayerKind; 5] = [
        PayerKind::PrepaidQps,
        PayerKind::SinglePackage,
        PayerKind::GeneralPackage,
        PayerKind::Payg,
        PayerKind::FreeDefault,
    ];

    pub fn as_str(self) -> &'static str {
        PAYERS[self as usize]
    }
}
