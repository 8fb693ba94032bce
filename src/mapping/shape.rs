//! The tree of a resource mapping's element paths, compiled at load time.
//!
//! Every row a resource mapping reads fills the same paths, so the objects and arrays
//! that can appear, and which element fills each leaf, are known before the first row.
//! Mapping a row computes one value per element, then builds the resource bottom-up from
//! this tree: a NULL leaf is left out, an object or array left empty disappears, holes in
//! arrays close up, an anchored parent whose anchor is NULL is left out whole, and so is an
//! extension left with its `url` alone (FHIR's ext-1: a value or nested extensions) — with
//! no name lookups and no intermediate tree. A `[*]` item is built once per part of the
//! split elements under it: each takes its part, the others repeat their value.

use super::{
    load::child_matches,
    model::{ChoiceGroup, ElementMapping, RequiredNode},
};
use crate::fhir::{Element, Name, Segment};

/// The compiled tree; node 0 is the resource.
#[derive(Debug, Clone)]
pub struct Shape {
    nodes: Vec<Node>,
    /// Per required node: where it is, and per required child the nodes that fill it.
    required: Vec<(usize, Vec<Vec<usize>>)>,
    /// Per choice group: where it is, and the nodes of its names.
    choices: Vec<(usize, Vec<usize>)>,
    /// Per `[*]` item: its node, and the split elements under it whose parts it is built
    /// from (kept apart from the nodes, which every row walks).
    spreads: Vec<(usize, Vec<usize>)>,
}

#[derive(Debug, Clone)]
struct Node {
    kind: Kind,
    /// Elements whose NULL removes this node.
    anchors: Vec<usize>,
    /// An item of an `extension` array: left out when nothing but its `url` is present.
    extension: bool,
}

#[derive(Debug, Clone)]
enum Kind {
    /// Filled by the element with this index.
    Leaf(usize),
    /// Filled by a part of the split element with this index (its value is an array).
    Part(usize),
    Object(Vec<(Name, usize)>),
    /// Items in index order (indices the mapping skips are absent).
    Array(Vec<(usize, usize)>),
}

/// A rule of the required/choice checks that a built resource breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// `required[i]` lacks its child `j`.
    Required(usize, usize),
    /// Two split elements under one `[*]` item have different numbers of parts: each
    /// element's index and its count.
    Parts([(usize, usize); 2]),
    /// `choices[i]` has this many of its names filled.
    Choice(usize, usize),
}

impl Shape {
    pub fn compile(
        elements: &[ElementMapping],
        required: &[RequiredNode],
        choices: &[ChoiceGroup],
    ) -> Self {
        let mut shape = Shape {
            nodes: vec![Node {
                kind: Kind::Object(Vec::new()),
                anchors: Vec::new(),
                extension: false,
            }],
            required: Vec::new(),
            choices: Vec::new(),
            spreads: Vec::new(),
        };
        for (index, element) in elements.iter().enumerate() {
            let leaf = shape.node_at(&element.path);
            // A split element fills one part per item of the `[*]` array on its path.
            let spread = element
                .split
                .as_ref()
                .and(element.path.iter().position(Segment::is_each));
            shape.nodes[leaf].kind = match spread {
                None => Kind::Leaf(index),
                Some(at) => {
                    let item = shape.node_at(&element.path[..=at]);
                    match shape.spreads.iter_mut().find(|(node, _)| *node == item) {
                        Some((_, parts)) => parts.push(index),
                        None => shape.spreads.push((item, vec![index])),
                    }
                    Kind::Part(index)
                }
            };
        }
        for (index, element) in elements.iter().enumerate() {
            if let Some(depth) = element.anchor {
                let parent = shape.node_at(&element.path[..depth]);
                shape.nodes[parent].anchors.push(index);
            }
        }
        let children_matching =
            |shape: &Shape, node: usize, matches: &dyn Fn(&str) -> bool| match &shape.nodes[node]
                .kind
            {
                Kind::Object(fields) => fields
                    .iter()
                    .filter(|(name, _)| matches(name))
                    .map(|(_, child)| *child)
                    .collect(),
                _ => Vec::new(),
            };
        for node in required {
            let at = shape.find(&node.path);
            let children = node
                .children
                .iter()
                .map(|child| match at {
                    Some(at) => children_matching(&shape, at, &|name| child_matches(child, name)),
                    None => Vec::new(),
                })
                .collect();
            shape.required.push((at.unwrap_or(usize::MAX), children));
        }
        for group in choices {
            let at = shape.find(&group.path);
            let members = match at {
                Some(at) => {
                    children_matching(&shape, at, &|name| group.names.iter().any(|n| n == name))
                }
                None => Vec::new(),
            };
            shape.choices.push((at.unwrap_or(usize::MAX), members));
        }
        shape
    }

    /// The node at `path`, created with its ancestors when absent.
    fn node_at(&mut self, path: &[Segment]) -> usize {
        let mut at = 0;
        for segment in path {
            at = self.field(at, &segment.name);
            if let Some(index) = segment.index {
                at = self.item(at, index);
                self.nodes[at].extension = segment.name == "extension";
            }
        }
        at
    }

    /// The child `name` of the object `object`, created when absent.
    fn field(&mut self, object: usize, name: &Name) -> usize {
        match &self.nodes[object].kind {
            Kind::Object(fields) => {
                if let Some((_, node)) = fields.iter().find(|(n, _)| n == name) {
                    return *node;
                }
            }
            _ => self.nodes[object].kind = Kind::Object(Vec::new()),
        }
        let child = self.push();
        if let Kind::Object(fields) = &mut self.nodes[object].kind {
            fields.push((*name, child));
        }
        child
    }

    /// The item `index` of the array `array`, created when absent.
    fn item(&mut self, array: usize, index: usize) -> usize {
        match &self.nodes[array].kind {
            Kind::Array(items) => {
                if let Some((_, node)) = items.iter().find(|(i, _)| *i == index) {
                    return *node;
                }
            }
            _ => self.nodes[array].kind = Kind::Array(Vec::new()),
        }
        let child = self.push();
        if let Kind::Array(items) = &mut self.nodes[array].kind {
            let place = items.partition_point(|(i, _)| *i < index);
            items.insert(place, (index, child));
        }
        child
    }

    fn push(&mut self) -> usize {
        self.nodes.push(Node {
            kind: Kind::Object(Vec::new()),
            anchors: Vec::new(),
            extension: false,
        });
        self.nodes.len() - 1
    }

    /// The node at `path`, if the mapping fills anything there.
    fn find(&self, path: &[Segment]) -> Option<usize> {
        let mut at = 0;
        for segment in path {
            let Kind::Object(fields) = &self.nodes[at].kind else {
                return None;
            };
            at = fields.iter().find(|(n, _)| *n == segment.name)?.1;
            if let Some(index) = segment.index {
                let Kind::Array(items) = &self.nodes[at].kind else {
                    return None;
                };
                at = items.iter().find(|(i, _)| *i == index)?.1;
            }
        }
        Some(at)
    }

    /// The resource's elements (as `(name, element)` appended to `fields`) from one value
    /// per element mapping, which are taken; or the first required/choice rule broken.
    pub fn build(
        &self,
        values: &mut [Option<Element>],
        fields: &mut Vec<(Name, Element)>,
    ) -> Result<(), Broken> {
        let mut present: smallvec::SmallVec<[bool; 64]> =
            smallvec::smallvec![false; self.nodes.len()];
        present[0] = true;
        let mut broken = None;
        let Kind::Object(root) = &self.nodes[0].kind else {
            unreachable!("the resource is an object")
        };
        for (name, child) in root {
            if let Some(element) = self.build_node(*child, values, &mut present, None, &mut broken)
            {
                fields.push((*name, element));
            }
        }
        if let Some(broken) = broken {
            return Err(broken);
        }
        for (i, (at, children)) in self.required.iter().enumerate() {
            if present.get(*at) != Some(&true) {
                continue;
            }
            if let Some(j) = children
                .iter()
                .position(|nodes| !nodes.iter().any(|n| present[*n]))
            {
                return Err(Broken::Required(i, j));
            }
        }
        for (i, (at, members)) in self.choices.iter().enumerate() {
            if present.get(*at) != Some(&true) {
                continue;
            }
            let filled = members.iter().filter(|n| present[**n]).count();
            if filled > 1 {
                return Err(Broken::Choice(i, filled));
            }
        }
        Ok(())
    }

    /// The node's element; `part`: the index of the part being built, under a `[*]` item.
    /// A rule broken on the way is kept in `broken` (the building goes on: the caller
    /// refuses the resource).
    fn build_node(
        &self,
        node: usize,
        values: &mut [Option<Element>],
        present: &mut [bool],
        part: Option<usize>,
        broken: &mut Option<Broken>,
    ) -> Option<Element> {
        let Node {
            kind,
            anchors,
            extension,
        } = &self.nodes[node];
        if anchors.iter().any(|e| values[*e].is_none()) {
            return None;
        }
        let element = match (kind, part) {
            (Kind::Leaf(e), None) => values[*e].take(),
            // Under a `[*]` item: repeated in every item.
            (Kind::Leaf(e), Some(_)) => values[*e].clone(),
            // Only ever under a `[*]` item, which says the part.
            (Kind::Part(e), _) => part
                .and_then(|k| part_of(&mut values[*e], k))
                .map(|item| std::mem::replace(item, Element::Array(Vec::new()))),
            // Sized for every child at once: one allocation per object or array.
            (Kind::Object(fields), _) => {
                let mut built = Vec::with_capacity(fields.len());
                for (name, child) in fields {
                    if let Some(element) = self.build_node(*child, values, present, part, broken) {
                        built.push((*name, element));
                    }
                }
                let empty = if *extension {
                    built.iter().all(|(name, _)| *name == "url")
                } else {
                    built.is_empty()
                };
                (!empty).then_some(Element::Object(built))
            }
            (Kind::Array(items), _) => {
                let mut built = Vec::with_capacity(items.len());
                for (index, child) in items {
                    if *index == Segment::EACH {
                        let parts = self.parts(*child);
                        for k in 0..part_count(parts, values, broken) {
                            // An item whose parts are all empty is not made.
                            if parts.iter().all(|e| part_of(&mut values[*e], k).is_none()) {
                                continue;
                            }
                            built.extend(self.build_node(*child, values, present, Some(k), broken));
                        }
                    } else {
                        built.extend(self.build_node(*child, values, present, part, broken));
                    }
                }
                (!built.is_empty()).then_some(Element::Array(built))
            }
        };
        present[node] = element.is_some();
        element
    }

    /// The split elements under the `[*]` item `node`.
    fn parts(&self, node: usize) -> &[usize] {
        self.spreads
            .iter()
            .find(|(at, _)| *at == node)
            .map_or(&[], |(_, parts)| parts)
    }
}

/// Part `k` of a split element's value, unless that part was empty (an empty array keeps
/// its place).
fn part_of(value: &mut Option<Element>, k: usize) -> Option<&mut Element> {
    match value {
        Some(Element::Array(items)) => items
            .get_mut(k)
            .filter(|item| !matches!(item, Element::Array(empty) if empty.is_empty())),
        _ => None,
    }
}

/// How many items a `[*]` item makes: the number of parts of its split elements `parts` (a
/// NULL one has none), which must agree; when they do not, none, and `broken` says why.
fn part_count(parts: &[usize], values: &[Option<Element>], broken: &mut Option<Broken>) -> usize {
    let mut count: Option<(usize, usize)> = None;
    for e in parts {
        let n = match &values[*e] {
            Some(Element::Array(items)) => items.len(),
            _ => continue,
        };
        match count {
            Some((first, m)) if m != n => {
                *broken = Some(Broken::Parts([(first, m), (*e, n)]));
                return 0;
            }
            Some(_) => {}
            None => count = Some((*e, n)),
        }
    }
    count.map_or(0, |(_, n)| n)
}
