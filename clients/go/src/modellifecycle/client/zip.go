package client

import (
	"archive/zip"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// What ZipDirectory leaves out, as the Python client and modelctl do: caches, VCS
// metadata, virtual environments and bytecode.
var (
	excludedDirs = map[string]bool{
		"__pycache__": true, ".git": true, ".hg": true, ".svn": true, ".venv": true,
		".mypy_cache": true, ".pytest_cache": true, ".ruff_cache": true,
	}
	excludedFiles    = map[string]bool{".DS_Store": true}
	excludedSuffixes = []string{".pyc", ".pyo"}
	// The earliest time a zip entry can hold: same files, same bytes, same sha256.
	fixedTime = time.Date(1980, 1, 1, 0, 0, 0, 0, time.UTC)
)

// ZipDirectory writes a zip of dir's files to w, deterministically: entries sorted,
// with slash-separated relative names, a fixed time and mode 0644, deflated. Caches
// (__pycache__, .git, .venv, ...) and bytecode are left out, and so are symlinked
// folders and special files; a symlink to a file is stored as a regular file with
// the target's content (the server refuses symlink entries). Returns the names stored.
func ZipDirectory(dir string, w io.Writer) ([]string, error) {
	info, err := os.Stat(dir)
	if err != nil {
		return nil, err
	}
	if !info.IsDir() {
		return nil, fmt.Errorf("%s is not a folder", dir)
	}
	var files []string
	if err := walk(dir, "", &files); err != nil {
		return nil, err
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("%s holds no files to zip", dir)
	}
	zw := zip.NewWriter(w)
	for _, name := range files {
		if err := addFile(zw, filepath.Join(dir, filepath.FromSlash(name)), name); err != nil {
			return nil, err
		}
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return files, nil
}

// walk appends the files under dir/rel (slash-separated names), sorted by name at
// each level as the Python client does.
func walk(dir, rel string, files *[]string) error {
	entries, err := os.ReadDir(filepath.Join(dir, filepath.FromSlash(rel)))
	if err != nil {
		return err
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Name() < entries[j].Name() })
	for _, entry := range entries {
		name := entry.Name()
		if rel != "" {
			name = rel + "/" + name
		}
		mode := entry.Type()
		if mode&os.ModeSymlink != 0 {
			target, err := os.Stat(filepath.Join(dir, filepath.FromSlash(name)))
			if err != nil || !target.Mode().IsRegular() {
				continue // dangling, or a link to a folder or a special file
			}
			mode = 0
		}
		switch {
		case mode.IsDir():
			if !excludedDirs[entry.Name()] {
				if err := walk(dir, name, files); err != nil {
					return err
				}
			}
		case mode.IsRegular():
			if included(entry.Name()) {
				*files = append(*files, name)
			}
		}
	}
	return nil
}

func included(base string) bool {
	if excludedFiles[base] {
		return false
	}
	for _, suffix := range excludedSuffixes {
		if strings.HasSuffix(base, suffix) {
			return false
		}
	}
	return true
}

func addFile(zw *zip.Writer, path, name string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	header := &zip.FileHeader{Name: name, Method: zip.Deflate, Modified: fixedTime}
	header.SetMode(0o644)
	out, err := zw.CreateHeader(header)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, f); err != nil {
		return fmt.Errorf("zipping %s: %w", name, err)
	}
	return nil
}

// errNoParent is returned by UploadZip when it is given no model name.
var errNoParent = errors.New("modellifecycle client: UploadSource needs the model's name")
