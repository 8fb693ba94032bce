//! HL7 FHIR R4 (4.0.1): the definitions mappings are checked against, the resources as
//! fhir-cdc carries them, and how sensitive they are.

mod definitions;
mod element;

pub use definitions::{
    definitions, upper_first, Definitions, ElementInfo, ElementType, PathError, ResolvedPath,
    Segment, TypeKind,
};
pub use element::{intern, names, Element, Name};

/// How sensitive a mapping's resources are (their confidentiality): chosen by the mapping,
/// it travels with every event and picks the class of topics the events go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sensitivity {
    /// Clinical or billing data for operational use (confidentiality `N`).
    Normal,
    /// Data that only restricted consumers may read (confidentiality `R`).
    Restricted,
}

impl Sensitivity {
    pub fn as_str(self) -> &'static str {
        match self {
            Sensitivity::Normal => "normal",
            Sensitivity::Restricted => "restricted",
        }
    }
}
