//! Mapping between byte offsets in a TOML document and its dotted keys, so that
//! errors can name both the key and the line.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// The 1-based line holding byte `offset` of `text`.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The dotted key whose name or value covers byte `offset`, most specific first:
/// an error inside `[generation]` at `top_p = 2` gives `generation.top_p`.
/// `None` when the text is not valid TOML or the offset is outside every key.
pub(crate) fn key_at(text: &str, offset: usize) -> Option<String> {
    let table = DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    find_offset(table.get_ref(), offset, &mut path).then(|| path.join("."))
}

fn find_offset(table: &DeTable<'_>, offset: usize, path: &mut Vec<String>) -> bool {
    for (key, value) in table.iter() {
        path.push(key.get_ref().to_string());
        if key.span().contains(&offset) {
            return true;
        }
        if let DeValue::Table(inner) = value.get_ref()
            && find_offset(inner, offset, path)
        {
            return true;
        }
        if value.span().contains(&offset) {
            return true;
        }
        path.pop();
    }
    false
}

/// The byte offset of the dotted `key`'s name in `text`, if the text sets it.
pub(crate) fn offset_of_key(text: &str, key: &str) -> Option<usize> {
    let table = DeTable::parse(text).ok()?;
    let mut table: &DeTable<'_> = table.get_ref();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (name, value): (&Spanned<_>, &Spanned<DeValue<'_>>) =
            table.iter().find(|(name, _)| name.get_ref() == part)?;
        if parts.peek().is_none() {
            return Some(name.span().start);
        }
        let DeValue::Table(inner) = value.get_ref() else {
            return None;
        };
        table = inner;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str =
        "# comment\n[generation]\ntop_k = 4\ntop_p = 2.0\n\n[server]\nmax_connections = 0\n";

    #[test]
    fn offsets_map_to_lines_and_keys() {
        let value = TEXT.find("2.0").unwrap();
        assert_eq!(line_of(TEXT, value), 4);
        assert_eq!(key_at(TEXT, value).as_deref(), Some("generation.top_p"));
        let name = TEXT.find("max_connections").unwrap();
        assert_eq!(
            key_at(TEXT, name).as_deref(),
            Some("server.max_connections")
        );
        assert_eq!(key_at(TEXT, 0), None);
    }

    #[test]
    fn keys_map_to_offsets() {
        let offset = offset_of_key(TEXT, "server.max_connections").unwrap();
        assert_eq!(line_of(TEXT, offset), 7);
        assert_eq!(offset_of_key(TEXT, "server.socket"), None);
        assert_eq!(offset_of_key(TEXT, "generation.top_k.x"), None);
    }
}
