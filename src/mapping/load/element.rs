//! A resource's elements: each element's path checked against the FHIR R4 definitions,
//! its value's source, its options, and the conditions (`when`) on elements and resources.

use super::*;
use crate::fhir::ElementType;

impl Reader<'_> {
    pub(super) fn elements(
        &mut self,
        node: &Node,
        resource_type: &str,
        table: &Table,
        defined: &Defined,
    ) -> Option<Vec<ElementMapping>> {
        let mut elements = Vec::new();
        let group = Group {
            prefix: String::new(),
            when: Vec::new(),
        };
        let complete = self.group(node, &group, resource_type, table, defined, &mut elements);
        (self.defined_once(&elements) && complete).then_some(elements)
    }

    /// Whether no element is defined twice for the same rows — in any spelling: a dotted
    /// key, a group, or both. The later would silently replace the earlier's value, so
    /// both places are named. The same path under different conditions is how a source
    /// is chosen per row, and stays.
    fn defined_once(&mut self, elements: &[ElementMapping]) -> bool {
        let mut seen: HashMap<(&[Segment], String), &Location> = HashMap::new();
        let mut once = true;
        for element in elements {
            // Conditions have no equality (patterns); their debug form names every part.
            let key = (element.path.as_slice(), format!("{:?}", element.when));
            if let Some(first) = seen.insert(key, &element.location) {
                once = false;
                self.errors.push(LoadError {
                    location: element.location.clone(),
                    message: format!(
                        "`{}` is defined twice for the same rows, here and at {first}: the later would silently replace the earlier's value; remove one, or give each conditions (`when`) that tell the rows apart",
                        element.written
                    ),
                });
            }
        }
        once
    }

    /// The elements of `node` (an `elements` map) into `out`, each under `group`'s path and
    /// conditions; whether all loaded. An entry whose value holds `elements` is a group: its
    /// key a path the group's elements continue, its `when` conditions they all share.
    pub(super) fn group(
        &mut self,
        node: &Node,
        group: &Group,
        resource_type: &str,
        table: &Table,
        defined: &Defined,
        out: &mut Vec<ElementMapping>,
    ) -> bool {
        let Some(map) = self.as_map(node, "`elements`") else {
            return false;
        };
        let mut complete = true;
        for (key, spec) in map.iter() {
            let path = format!("{}{}", group.prefix, key.as_str());
            let nested = spec
                .as_mapping()
                .filter(|m| m.get_node("elements").is_some());
            if let Some(inner) = nested {
                let fields = self.fields(inner, "a group of elements", &["when", "elements"]);
                let own = match fields.get("when") {
                    Some(n) => self.conditions(n, table),
                    None => Some(Vec::new()),
                };
                let Some(own) = own else {
                    complete = false;
                    continue;
                };
                let inner_group = Group {
                    prefix: format!("{path}."),
                    when: group.when.iter().cloned().chain(own).collect(),
                };
                complete &= self.group(
                    fields["elements"],
                    &inner_group,
                    resource_type,
                    table,
                    defined,
                    out,
                );
                continue;
            }
            match self.element(&path, key.span(), spec, resource_type, table, defined) {
                Some(mut element) => {
                    element.when.splice(0..0, group.when.iter().cloned());
                    out.push(element);
                }
                None => complete = false,
            }
        }
        complete
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn element(
        &mut self,
        path_text: &str,
        key_span: &Span,
        spec: &Node,
        resource_type: &str,
        table: &Table,
        defined: &Defined,
    ) -> Option<ElementMapping> {
        let path = match Segment::parse_path(path_text) {
            Ok(path) => path,
            Err(e) => {
                self.error(key_span, format!("element path `{path_text}`: {e}"));
                return None;
            }
        };
        let resolved = match definitions().resolve(resource_type, &path) {
            Ok(resolved) => resolved,
            Err(e) => {
                self.error(key_span, format!("{resource_type}.{path_text}: {e}"));
                return None;
            }
        };
        let leaf = resolved.leaf;
        let what = format!("{resource_type}.{path_text}");
        if path.iter().filter(|s| s.is_each()).count() > 1 {
            self.error(
                key_span,
                format!("{what}: one `[*]` per path (a split column makes one level of items)"),
            );
            return None;
        }
        let containers =
            std::iter::once(resource_type).chain(resolved.nodes.iter().map(String::as_str));
        if let Some((container, left_out)) = containers
            .zip(&path)
            .find(|(container, segment)| !schema::carried(segment.name, container))
        {
            self.error(
                key_span,
                format!(
                    "{what}: `{}` of {container} is not carried by the canonical events' Avro schemas (they leave out modifierExtension, the extensions of datatypes other than Extension, and the id of datatypes and backbone elements: docs/events.md), so no event could hold it",
                    left_out.name
                ),
            );
            return None;
        }
        let location = self.location(key_span);
        let Some(fhir_type) = Primitive::of(&leaf.code) else {
            self.error(
                key_span,
                format!("{what}: fhir-cdc cannot fill FHIR {} elements", leaf.code),
            );
            return None;
        };
        let mut element = ElementMapping {
            path,
            when: Vec::new(),
            source: ValueSource::Template(Template::parse("").ok()?),
            fhir_type,
            required_codes: leaf.required_codes,
            definition: leaf.definition.clone(),
            written: what.clone(),
            required: false,
            anchor: None,
            conversion: Conversion::default(),
            transform: Transform::default(),
            translate: None,
            protect: None,
            lookup: None,
            split: None,
            default: None,
            fixed: None,
            translated: None,
            location,
        };
        if spec.as_scalar().is_some() {
            element.source = ValueSource::Template(self.template(spec, &what, table)?);
        } else {
            let map = self.as_map(spec, &what)?;
            let spec = Spec {
                fields: self.fields(map, "an element", ELEMENT_KEYS),
                span: start_of(map),
                key_span,
                what: &what,
                leaf: &leaf,
            };
            self.element_source(&spec, &mut element, table, defined)?;
            self.element_options(&spec, &mut element, table, defined)?;
            self.element_conversion(&spec, &mut element)?;
        }
        self.check_values(&element, key_span, &what);
        precompute(&mut element)?;
        Some(element)
    }

    /// Where an element's value comes from (`column`, `template`, `value`, `reference`,
    /// read through a `lookup`, `split` into items).
    fn element_source(
        &mut self,
        spec: &Spec<'_, '_>,
        element: &mut ElementMapping,
        table: &Table,
        defined: &Defined,
    ) -> Option<()> {
        let (fields, span, key_span, what, leaf) = (
            &spec.fields,
            &spec.span,
            spec.key_span,
            spec.what,
            spec.leaf,
        );
        // Read through a lookup, the source's columns are the looked-up table's.
        let looked_up: Table;
        let source_table = match fields.get("lookup") {
            None => table,
            Some(n) => {
                let name = self.text(n, "`lookup`")?;
                let Some(lookup) = defined.lookups.get(name) else {
                    let known = defined.lookups.keys();
                    self.error(n.span(), unknown("lookup", name, known));
                    return None;
                };
                element.lookup = Some(lookup.clone());
                looked_up = Table {
                    lookup: Some(name.to_owned()),
                    key: Vec::new(),
                    columns: Some(
                        lookup
                            .key
                            .iter()
                            .chain(&lookup.columns)
                            .map(|c| c.to_string())
                            .collect(),
                    ),
                };
                &looked_up
            }
        };
        let sources: Vec<&str> = ["column", "template", "value", "reference"]
            .into_iter()
            .filter(|k| fields.contains_key(k))
            .collect();
        element.source = match sources.as_slice() {
            ["column"] => {
                let column = self.text(fields["column"], "`column`")?;
                self.check_columns(fields["column"].span(), source_table, [column]);
                ValueSource::Column(Column::new(column))
            }
            ["template"] | ["value"] => {
                ValueSource::Template(self.template(fields[sources[0]], what, source_table)?)
            }
            ["reference"] => {
                let target = self.text(fields["reference"], "`reference`")?;
                if !definitions().is_resource(target) {
                    self.error(
                        fields["reference"].span(),
                        format!("`{target}` is not a FHIR R4 resource type"),
                    );
                    return None;
                }
                if leaf.code != "string" || !leaf.definition.ends_with("Reference.reference") {
                    self.error(key_span, format!("{what}: `reference` fills a Reference's `reference` element (e.g. `subject.reference`), not a {}", leaf.definition));
                    return None;
                }
                let Some(id_node) = fields.get("id") else {
                    self.error(
                        span,
                        format!(
                            "{what}: `reference` needs `id`, the referenced resource's id template"
                        ),
                    );
                    return None;
                };
                let id = self.template(id_node, "`id`", source_table)?;
                // `protect` tokenizes the referenced id, as `protect` on that resource's
                // own `id` does, not the reference's text.
                let id = match fields.get("protect") {
                    Some(n) => self.id_protection(n, id)?,
                    None => id,
                };
                let external = match fields.get("external") {
                    Some(n) => self.boolean(n, "`external`")?,
                    None => false,
                };
                ValueSource::Reference {
                    resource_type: target.to_owned(),
                    id,
                    external,
                }
            }
            _ => {
                self.error(
                    span,
                    format!(
                        "{what}: give exactly one of `column`, `template`, `value` or `reference`"
                    ),
                );
                return None;
            }
        };
        if let (Some(n), ValueSource::Template(t)) = (fields.get("lookup"), &element.source) {
            if t.is_literal() {
                self.error(n.span(), format!("{what}: a literal reads no column, so `lookup` has nothing to read: give `column`, `template` or `reference`"));
                return None;
            }
        }
        if let Some(n) = fields.get("split") {
            let separator = self.text(n, "`split`")?;
            let literal = matches!(&element.source, ValueSource::Template(t) if t.is_literal());
            if separator.is_empty() || literal {
                self.error(n.span(), format!("{what}: `split` takes the separator the column's parts are written with (like \"|\" or \",\"), and a column or template to split"));
                return None;
            }
            if !element.path.iter().any(Segment::is_each) {
                self.error(n.span(), format!("{what}: `split` makes one item per part: write the repeating element the items go into with `[*]`, as in `code.coding[*].code`"));
                return None;
            }
            element.split = Some(separator.to_owned());
        }
        for key in ["id", "external"] {
            if fields.contains_key(key) && sources != ["reference"] {
                self.error(
                    fields[key].span(),
                    format!("{what}: `{key}` belongs to a `reference`"),
                );
            }
        }
        Some(())
    }

    /// What an element is and how it is filled: `required`, `when`, `anchor`, `protect`,
    /// `default`, `translate`.
    fn element_options(
        &mut self,
        spec: &Spec<'_, '_>,
        element: &mut ElementMapping,
        table: &Table,
        defined: &Defined,
    ) -> Option<()> {
        let (fields, what, leaf) = (&spec.fields, spec.what, spec.leaf);
        if let Some(n) = fields.get("required") {
            element.required = self.boolean(n, "`required`")?;
        }
        if let Some(n) = fields.get("when") {
            element.when = self.conditions(n, table)?;
        }
        if let Some(n) = fields.get("anchor") {
            let ancestor = match self.text(n, "`anchor`")? {
                "true" => Some(element.path.len() - 1),
                "false" => None,
                prefix => match Segment::parse_path(prefix) {
                    Ok(p) if p.len() < element.path.len() && element.path[..p.len()] == p[..] => {
                        Some(p.len())
                    }
                    _ => {
                        self.error(n.span(), format!("{what}: `anchor` is true, or an element path that contains this one (like `{}`)", display_path(&element.path[..1])));
                        return None;
                    }
                },
            };
            if ancestor == Some(0) {
                self.error(
                    n.span(),
                    format!(
                        "{what}: `anchor` needs a parent element; a top-level element has none"
                    ),
                );
                return None;
            }
            element.anchor = ancestor;
        }
        if let (Some(n), false) = (
            fields.get("protect"),
            matches!(element.source, ValueSource::Reference { .. }),
        ) {
            element.protect = match self.text(n, "`protect`")? {
                "mask" => Some(Protect::Mask),
                "token" => Some(Protect::Token),
                other => {
                    self.error(n.span(), format!("protect `{other}`: use mask or token"));
                    return None;
                }
            };
            if !matches!(leaf.code.as_str(), "string" | "code" | "id" | "markdown") {
                self.error(n.span(), format!("{what} is a {}; only string, code, id and markdown elements can be protected", leaf.code));
            }
        }
        if let Some(n) = fields.get("default") {
            element.default = Some(self.text(n, "`default`")?.to_owned());
        }
        if let Some(n) = fields.get("translate") {
            let name = self.text(n, "`translate`")?;
            match defined.translations.get(name) {
                Some(t) => element.translate = Some(t.clone()),
                None => {
                    let known = defined.translations.keys();
                    self.error(n.span(), unknown("translation", name, known));
                    return None;
                }
            }
        }

        Some(())
    }

    /// How a column's value becomes the element's: `trim`, `zone`, `true_values` and
    /// `false_values`, `capture`, `case`, `format`, `zero_date`, `control_characters`.
    fn element_conversion(
        &mut self,
        spec: &Spec<'_, '_>,
        element: &mut ElementMapping,
    ) -> Option<()> {
        let (fields, span, what, leaf) = (&spec.fields, &spec.span, spec.what, spec.leaf);
        if let Some(n) = fields.get("trim") {
            element.conversion.trim = self.boolean(n, "`trim`")?;
        }
        if let Some(n) = fields.get("zone") {
            let zone = self.text(n, "`zone`")?;
            match chrono_tz::Tz::from_str(zone) {
                Ok(tz) => element.conversion.zone = Some(tz),
                Err(_) => {
                    self.error(n.span(), format!("`{zone}` is not an IANA time zone (e.g. America/Chicago, Europe/Berlin, UTC)"));
                    return None;
                }
            }
        }
        for (key, target) in [
            ("true_values", &mut element.conversion.true_values),
            ("false_values", &mut element.conversion.false_values),
        ] {
            if let Some(n) = fields.get(key) {
                *target = self.texts(n, key)?.into_iter().map(|(v, _)| v).collect();
            }
        }
        if (fields.contains_key("true_values") || fields.contains_key("false_values"))
            && leaf.code != "boolean"
        {
            self.error(
                span,
                format!(
                    "{what} is a {}; `true_values`/`false_values` apply to booleans",
                    leaf.code
                ),
            );
        }
        if let Some(n) = fields.get("capture") {
            let regex = self.regex(n, "capture", str::to_owned)?;
            if regex.captures_len() != 2 {
                self.error(n.span(), format!("`capture` needs exactly one group `( … )`, whose text becomes the value; this pattern has {} (write `(?: … )` for a group that captures nothing)", regex.captures_len() - 1));
                return None;
            }
            element.transform.capture = Some(regex);
        }
        if let Some(n) = fields.get("case") {
            element.transform.case = match self.text(n, "`case`")? {
                "upper" => Some(Case::Upper),
                "lower" => Some(Case::Lower),
                other => {
                    self.error(n.span(), format!("case `{other}`: use upper or lower"));
                    return None;
                }
            };
        }
        if let Some(n) = fields.get("format") {
            let format = self.text(n, "`format`")?;
            let (date, time, offset) = match format_reads(format) {
                Ok(reads) => reads,
                Err(why) => {
                    self.error(n.span(), why);
                    return None;
                }
            };
            let fits = match leaf.code.as_str() {
                "date" => date && !time,
                "dateTime" => date,
                "instant" => date && time,
                "time" => time && !date && !offset,
                _ => {
                    self.error(n.span(), format!("{what} is of FHIR type {}; `format` reads text as a date, dateTime, instant or time", leaf.code));
                    return None;
                }
            };
            if !fits {
                self.error(
                    n.span(),
                    format!(
                        "{what} is of FHIR type {}; `{format}` reads {}",
                        leaf.code,
                        match (date, time) {
                            (true, true) => "a date and a time",
                            (true, false) => "a date only",
                            (false, true) => "a time only",
                            (false, false) => "neither a date nor a time",
                        }
                    ),
                );
                return None;
            }
            if date && time && !offset && !fields.contains_key("zone") {
                self.error(n.span(), format!("{what}: `{format}` reads a time without its offset: add `zone`, the IANA zone it was written in"));
                return None;
            }
            element.transform.format = Some(format.to_owned());
        }
        if let Some(n) = fields.get("zero_date") {
            element.conversion.zero_date_as_null = match self.text(n, "`zero_date`")? {
                "null" => true,
                "reject" => false,
                other => {
                    self.error(n.span(), format!("zero_date `{other}`: use null (leave MySQL's zero dates out) or reject (send the row to the dead-letter topic, the default)"));
                    return None;
                }
            };
        }
        if let Some(n) = fields.get("control_characters") {
            element.conversion.control = match self.text(n, "`control_characters`")? {
                "reject" => ControlCharacters::Reject,
                "strip" => ControlCharacters::Strip,
                "space" => ControlCharacters::Space,
                other => {
                    self.error(n.span(), format!("control_characters `{other}`: use reject (send the row to the dead-letter topic, the default), strip or space"));
                    return None;
                }
            };
        }
        Some(())
    }

    /// Literal values, defaults and translation targets must fit the element's type and
    /// required binding.
    pub(super) fn check_values(&mut self, element: &ElementMapping, span: &Span, what: &str) {
        let mut fixed: Vec<(String, &str)> = Vec::new();
        if let ValueSource::Template(t) = &element.source {
            if t.is_literal() {
                if let Ok(text) = t.render(&crate::change::Row::default(), &Default::default()) {
                    fixed.push((text, "value"));
                }
            }
        }
        if let Some(default) = &element.default {
            fixed.push((default.clone(), "default"));
        }
        if let Some(translation) = &element.translate {
            fixed.extend(
                translation
                    .codes
                    .values()
                    .map(|c| (c.clone(), "translation target")),
            );
            if let Unmapped::Default(code) = &translation.unmapped {
                fixed.push((code.clone(), "translation default"));
            }
        }
        for (text, role) in fixed {
            if let Err(e) = to_fhir(
                &Value::Text(text.clone()),
                element.fhir_type,
                &element.conversion,
            ) {
                self.error(span, format!("{what}: {role} `{text}` does not fit: {e}"));
            } else if let Some(codes) = element.required_codes {
                if !codes.contains(&text) {
                    let mut allowed: Vec<&str> = codes.iter().map(String::as_str).collect();
                    allowed.sort_unstable();
                    self.error(span, format!("{what}: {role} `{text}` is not in the required value set of {}; allowed: {}", element.definition, allowed.join(", ")));
                }
            }
        }
    }

    /// Every node the elements create must have the children FHIR requires; check that the
    /// mapping fills them, and list them for the runtime check.
    pub(super) fn required_nodes(
        &mut self,
        resource_type: &str,
        elements: &[ElementMapping],
        span: &Span,
    ) -> Option<Vec<RequiredNode>> {
        let mut nodes: BTreeMap<Vec<Segment>, String> = BTreeMap::new();
        nodes.insert(Vec::new(), resource_type.to_owned());
        for element in elements {
            let resolved = definitions().resolve(resource_type, &element.path).ok()?;
            for (depth, definition) in resolved.nodes.into_iter().enumerate() {
                nodes.insert(element.path[..=depth].to_vec(), definition);
            }
        }
        let mut required = Vec::new();
        let mut complete = true;
        for (path, definition) in nodes {
            let children: Vec<String> = definitions()
                .required_children(&definition)
                .map(str::to_owned)
                .collect();
            for child in &children {
                if !fills(elements, &path, child) {
                    let node = if path.is_empty() {
                        resource_type.to_owned()
                    } else {
                        format!("{resource_type}.{}", display_path(&path))
                    };
                    self.error(span, format!("{node} must have `{child}` ({definition}.{child} is required), but no element fills it"));
                    complete = false;
                }
            }
            if definition == "Extension"
                && !self.extension_content(&path, elements, resource_type, span)
            {
                complete = false;
            }
            if !children.is_empty() {
                required.push(RequiredNode {
                    path,
                    definition,
                    children,
                });
            }
        }
        complete.then_some(required)
    }

    /// Every `[*]` array has an element that splits a column under it: the parts decide how
    /// many items it has.
    pub(super) fn spreads_split(
        &mut self,
        resource_type: &str,
        elements: &[ElementMapping],
        span: &Span,
    ) {
        let mut spreads: BTreeMap<Vec<Segment>, bool> = BTreeMap::new();
        for element in elements {
            if let Some(at) = element.path.iter().position(Segment::is_each) {
                *spreads.entry(element.path[..=at].to_vec()).or_default() |=
                    element.split.is_some();
            }
        }
        for (path, _) in spreads.into_iter().filter(|(_, split)| !split) {
            self.error(span, format!("{resource_type}.{}: `[*]` makes one item per part of a split column, but no element under it has `split`", display_path(&path)));
        }
    }

    /// FHIR's ext-1 for the extension at `path`: the mapping fills its `value[x]` or nested
    /// extensions, not both and not neither. (A row whose value is NULL leaves the
    /// extension out, url and all: see [`Shape`].)
    pub(super) fn extension_content(
        &mut self,
        path: &[Segment],
        elements: &[ElementMapping],
        resource_type: &str,
        span: &Span,
    ) -> bool {
        let filled = |child| fills(elements, path, child);
        let problem = match (filled("value[x]"), filled("extension")) {
            (true, true) => "fills both a value[x] and nested extensions",
            (false, false) => "fills neither a value[x] nor nested extensions",
            _ => return true,
        };
        self.error(
            span,
            format!(
                "{resource_type}.{} {problem}; FHIR's ext-1 wants exactly one of the two (a complex extension such as US Core race holds only nested extensions, each with its own url and value)",
                display_path(path)
            ),
        );
        false
    }
}

/// The keys of an element's map.
const ELEMENT_KEYS: &[&str] = &[
    "column",
    "template",
    "value",
    "reference",
    "id",
    "external",
    "translate",
    "required",
    "anchor",
    "trim",
    "zone",
    "true_values",
    "false_values",
    "protect",
    "default",
    "zero_date",
    "control_characters",
    "when",
    "capture",
    "case",
    "format",
    "lookup",
    "split",
];

/// An element's map, and what messages about it name.
struct Spec<'n, 'w> {
    fields: BTreeMap<&'n str, &'n Node>,
    /// Where the map begins.
    span: Span,
    /// The element's key.
    key_span: &'w Span,
    /// `Resource.path`, as messages name it.
    what: &'w str,
    leaf: &'w ElementType,
}

/// What never depends on a row, converted now, once, to values shared by every resource
/// (checked before: errors are reported, not converted).
fn precompute(element: &mut ElementMapping) -> Option<()> {
    // What never depends on a row is converted now, once, to values shared by every
    // resource (checked above: errors are reported, not converted).
    let constant = |text: &str| {
        to_fhir(
            &Value::Text(text.to_owned()),
            element.fhir_type,
            &element.conversion,
        )
        .ok()
        .map(|value| match value {
            crate::fhir::Element::String(text) => {
                crate::fhir::Element::Shared(crate::fhir::intern(&text))
            }
            other => other,
        })
    };
    if let ValueSource::Template(t) = &element.source {
        if t.is_literal() && element.translate.is_none() && element.protect.is_none() {
            let text = t
                .render(&crate::change::Row::default(), &Default::default())
                .ok()?;
            element.fixed = constant(&text);
        }
    }
    if let (Some(translation), None) = (&element.translate, element.protect) {
        element.translated = Some(Translated {
            codes: translation
                .codes
                .iter()
                .filter_map(|(code, target)| Some((code.clone(), constant(target)?)))
                .collect(),
            default: match &translation.unmapped {
                Unmapped::Default(target) => constant(target),
                _ => None,
            },
        });
    }

    Some(())
}

/// "no `what` `name`; `whats` defines: …", the names in order (or none).
fn unknown<'a>(what: &str, name: &str, known: impl Iterator<Item = &'a String>) -> String {
    let mut known: Vec<&str> = known.map(String::as_str).collect();
    known.sort_unstable();
    let known = if known.is_empty() {
        "none".to_owned()
    } else {
        known.join(", ")
    };
    format!("no {what} `{name}`; `{what}s` defines: {known}")
}
