//! HL7 FHIR R4 (4.0.1): the definitions mappings are checked against.

mod definitions;
mod element;

pub use definitions::{
    definitions, upper_first, Definitions, ElementInfo, ElementType, PathError, ResolvedPath,
    Segment, TypeKind,
};
pub use element::{intern, names, Element, Name};
