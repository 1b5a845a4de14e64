// The bundle directory on disk: files read without ever leaving it, and checked against the manifest
// (docs/bundle-format.md, "Integrity").
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <unordered_set>

#include "manifest.hpp"

namespace slim {

constexpr const char* kManifestFile = "manifest.json";
constexpr const char* kDigestFile = "manifest.sha256";  // "<sha256 of manifest.json>  manifest.json\n"

// How much of a bundle is checked when it is opened (slim_verify).
enum class Verify {
    Fast = 0,  // manifest digest; every file listed, regular, of its listed size; stage graph files' sha256
    Full = 1,  // and the sha256 of every file (reads the whole bundle)
};

// A bundle directory, opened once. Everything under it is reached through its descriptor one path
// component at a time without following symbolic links (O_NOFOLLOW), and must be a directory or a
// regular file: a symlink (even one pointing inside), FIFO, socket or device is refused, never opened
// for reading. The path given may itself be a symlink to the bundle directory.
class BundleDir {
  public:
    explicit BundleDir(const std::string& path);  // Error(IO) when it is not a readable directory
    ~BundleDir();
    BundleDir(const BundleDir&) = delete;
    BundleDir& operator=(const BundleDir&) = delete;

    const std::string& path() const { return path_; }
    // The whole of regular file `rel`, of at most `max_bytes`. IO when missing, BUNDLE when not a regular file or larger.
    std::string read(const std::string& rel, int64_t max_bytes) const;
    // The same into `bytes`, reusing its buffer: no fresh pages to fault in when it is already that large.
    void read(const std::string& rel, int64_t max_bytes, std::string& bytes) const;
    // Every regular file under the directory, relative path -> size; BUNDLE naming anything else found.
    std::map<std::string, int64_t> files() const;
    // sha256 of regular file `rel`, checked to be `size` bytes before it is read; `on_chunk(n)` per chunk read.
    std::string sha256(const std::string& rel, int64_t size, const std::function<void(size_t)>& on_chunk = {}) const;

  private:
    int open_regular(const std::string& rel, int64_t* size) const;  // a descriptor the caller closes
    std::string path_;
    int fd_ = -1;
};

// The listing: every file on disk is listed in the manifest and every listed file is there, regular, of
// its listed size. Reads no file. Throws Error(BUNDLE) naming the file.
void check_listing(const BundleDir& dir, const Manifest& manifest);

// The files a check at `level` hashes: the stage graphs at every level (small: their weights are external
// data), every file at Full.
std::unordered_set<std::string> hashed_files(const Manifest& manifest, Verify level);

// An engine's reads of its bundle at open: check_listing first, then each file the engine uses read
// whole into memory, checked to be its listed size and, when `level` hashes it, its sha256 checked on
// the very bytes returned (what ONNX Runtime is given is what was verified).
class BundleReader {
  public:
    BundleReader(const BundleDir& dir, const Manifest& manifest, Verify level);
    bool listed(const std::string& rel) const;
    // The bytes of listed file `rel`. Error(BUNDLE) when it is not listed, changed size, or its digest differs.
    std::string read(const std::string& rel);
    void read(const std::string& rel, std::string& bytes);  // the same into `bytes`, reusing its buffer
    // At Full, hashes (from disk) the listed files no read() took, so the open checked every file.
    void finish();

  private:
    const BundleDir& dir_;
    std::map<std::string, const FileEntry*> listed_, unread_;
    std::unordered_set<std::string> hashed_;
};

// Called while files are hashed: the file (bundle-relative), and bytes hashed / to hash in all.
using VerifyProgress = std::function<void(const std::string& file, uint64_t done, uint64_t total)>;

// Checks the bundle's files against its (loaded, digest-checked) manifest: every file on disk is listed
// and every listed file is there, regular, of its listed size (all before any file is read); then the
// sha256 of the stage graph files (Fast) or of every file (Full). Throws Error(BUNDLE) naming the file.
void verify_files(const BundleDir& dir, const Manifest& manifest, Verify level, const VerifyProgress& progress = {});

}  // namespace slim
