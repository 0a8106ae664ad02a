//! The files of the folder as last parsed: a file whose text did not change is not parsed
//! again (parsing YAML is most of a re-read's cost; the re-read itself stays, so the folder is
//! always taken as it is on disk).

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};

use super::parse::{self, Parsed};
use crate::cluster::Diagnostic;

/// One file's text (by hash) and what parsing it gave.
struct ParsedFile {
    text_hash: u64,
    objects: Vec<Parsed>,
    diagnostics: Vec<Diagnostic>,
}

/// Parsed files by path.
#[derive(Default)]
pub struct ParsedFiles {
    files: HashMap<PathBuf, ParsedFile>,
    /// Files parsed (not taken from here) since the last [`ParsedFiles::take_parsed_count`].
    parsed_since: usize,
}

fn text_hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

impl ParsedFiles {
    /// The objects of the file at `path` holding `text`, parsed only if the text changed since
    /// the last call for that path; its diagnostics are added to `diagnostics` either way.
    pub fn parse(
        &mut self,
        path: &Path,
        text: &str,
        diagnostics: &mut Vec<Diagnostic>,
    ) -> Vec<Parsed> {
        let hash = text_hash(text);
        let file = match self.files.get(path) {
            Some(file) if file.text_hash == hash => file,
            _ => {
                self.parsed_since += 1;
                let mut file_diagnostics = Vec::new();
                let objects = parse::parse_file(path, text, &mut file_diagnostics);
                self.files.insert(
                    path.to_owned(),
                    ParsedFile {
                        text_hash: hash,
                        objects,
                        diagnostics: file_diagnostics,
                    },
                );
                &self.files[path]
            }
        };
        diagnostics.extend(file.diagnostics.iter().cloned());
        file.objects.clone()
    }

    /// Forgets the files not in `present` (deleted from the folder).
    pub fn keep_only(&mut self, present: &HashSet<PathBuf>) {
        self.files.retain(|path, _| present.contains(path));
    }

    /// How many files were parsed since the last call.
    pub fn take_parsed_count(&mut self) -> usize {
        std::mem::take(&mut self.parsed_since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str =
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n";

    #[test]
    fn only_new_or_changed_texts_are_parsed() {
        let mut files = ParsedFiles::default();
        let (a, b) = (Path::new("/m/a.yaml"), Path::new("/m/b.yaml"));
        let mut diagnostics = Vec::new();
        assert_eq!(files.parse(a, SERVICE, &mut diagnostics).len(), 1);
        assert_eq!(files.parse(b, "kind: [", &mut diagnostics).len(), 0);
        assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
        let present: HashSet<PathBuf> = [a.to_owned(), b.to_owned()].into();
        files.keep_only(&present);
        assert_eq!(files.take_parsed_count(), 2);

        // Unchanged: taken as parsed, diagnostics included.
        let mut again = Vec::new();
        assert_eq!(files.parse(a, SERVICE, &mut again).len(), 1);
        assert_eq!(files.parse(b, "kind: [", &mut again).len(), 0);
        assert_eq!(again, diagnostics);
        files.keep_only(&present);
        assert_eq!(files.take_parsed_count(), 0);

        // One file changed, one deleted.
        let changed = SERVICE.replace("port: 80", "port: 81");
        assert_eq!(files.parse(a, &changed, &mut Vec::new()).len(), 1);
        files.keep_only(&[a.to_owned()].into());
        assert_eq!(files.take_parsed_count(), 1);
        // A file deleted and written again with the same text is parsed again.
        assert_eq!(files.parse(b, "kind: [", &mut Vec::new()).len(), 0);
        assert_eq!(files.take_parsed_count(), 1);
    }
}
