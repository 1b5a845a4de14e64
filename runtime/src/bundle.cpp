#include "bundle.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <vector>

#include "error.hpp"
#include "sha256.hpp"

namespace slim {
namespace {

constexpr int kMaxDirDepth = 16;         // directories nested under the bundle
constexpr size_t kMaxEntries = 1 << 20;  // files and directories under the bundle

// Closes a descriptor when it goes out of scope.
struct Fd {
    int fd = -1;
    explicit Fd(int f) : fd(f) {}
    ~Fd() {
        if (fd >= 0) ::close(fd);
    }
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
};

const char* kind_of(mode_t mode) {
    if (S_ISLNK(mode)) return "a symbolic link";
    if (S_ISFIFO(mode)) return "a FIFO";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISSOCK(mode)) return "a socket";
    if (S_ISDIR(mode)) return "a directory";
    return "an unknown kind of file";
}

[[noreturn]] void not_regular(const std::string& path, mode_t mode) {
    throw Error(SLIM_ERR_BUNDLE, "bundle file " + path + " is not a regular file (" + kind_of(mode) +
                                     "): every file of a bundle must be a regular file inside it (copy the bundle's files, not links "
                                     "to them, or re-export it)");
}

std::vector<std::string> components(const std::string& rel) {
    std::vector<std::string> parts;
    size_t start = 0;
    while (true) {
        const size_t slash = rel.find('/', start);
        parts.push_back(rel.substr(start, slash == std::string::npos ? std::string::npos : slash - start));
        if (slash == std::string::npos) return parts;
        start = slash + 1;
    }
}

void walk(int dir_fd, const std::string& root, const std::string& prefix, int depth, std::map<std::string, int64_t>& out, size_t& entries) {
    const int listing_fd = ::dup(dir_fd);
    if (listing_fd < 0) throw Error(SLIM_ERR_IO, "cannot list " + root + "/" + prefix + ": " + std::strerror(errno));
    DIR* dir = ::fdopendir(listing_fd);
    if (!dir) {
        ::close(listing_fd);
        throw Error(SLIM_ERR_IO, "cannot list " + root + "/" + prefix + ": " + std::strerror(errno));
    }
    std::vector<std::string> names;
    while (const dirent* entry = ::readdir(dir)) {
        const std::string name = entry->d_name;
        if (name != "." && name != "..") names.push_back(name);
    }
    ::closedir(dir);
    for (const std::string& name : names) {
        if (++entries > kMaxEntries)
            throw Error(SLIM_ERR_BUNDLE, root + " holds more than " + std::to_string(kMaxEntries) + " files and directories");
        const std::string rel = prefix + name;
        struct stat st{};
        if (::fstatat(dir_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0)
            throw Error(SLIM_ERR_IO, "cannot stat " + root + "/" + rel + ": " + std::strerror(errno));
        if (S_ISREG(st.st_mode)) {
            out[rel] = static_cast<int64_t>(st.st_size);
        } else if (S_ISDIR(st.st_mode)) {
            if (depth >= kMaxDirDepth) throw Error(SLIM_ERR_BUNDLE, root + "/" + rel + " is nested too deep inside the bundle");
            Fd sub(::openat(dir_fd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
            if (sub.fd < 0) throw Error(SLIM_ERR_IO, "cannot open " + root + "/" + rel + ": " + std::strerror(errno));
            walk(sub.fd, root, rel + "/", depth + 1, out, entries);
        } else {
            not_regular(root + "/" + rel, st.st_mode);
        }
    }
}

}  // namespace

BundleDir::BundleDir(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NONBLOCK | O_CLOEXEC);
    if (fd_ < 0)
        throw Error(SLIM_ERR_IO,
                    "cannot open " + path + "/" + kManifestFile + " (is '" + path + "' an engine bundle? " + std::strerror(errno) + ")");
}

BundleDir::~BundleDir() {
    if (fd_ >= 0) ::close(fd_);
}

int BundleDir::open_regular(const std::string& rel, int64_t* size) const {
    const std::vector<std::string> parts = components(rel);
    int dir_fd = fd_;
    std::unique_ptr<Fd> held;  // the directory we are in, when it is not the bundle's own
    std::string walked;
    for (size_t i = 0; i < parts.size(); ++i) {
        const std::string& part = parts[i];
        if (part.empty() || part == "." || part == "..") throw Error(SLIM_ERR_BUNDLE, "'" + rel + "' is not a path inside the bundle");
        walked += (i ? "/" : "") + part;
        const std::string full = path_ + "/" + walked;
        struct stat st{};
        if (::fstatat(dir_fd, part.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0)
            throw Error(SLIM_ERR_IO, "cannot open " + full + ": " + std::strerror(errno));
        const bool last = i + 1 == parts.size();
        if (last ? !S_ISREG(st.st_mode) : !S_ISDIR(st.st_mode)) not_regular(full, st.st_mode);
        // Checked with fstatat first, so a FIFO or device is never opened; O_NOFOLLOW and O_NONBLOCK in case
        // it was swapped in since, and fstat below confirms what was opened.
        const int flags = O_RDONLY | O_NOFOLLOW | O_CLOEXEC | (last ? O_NONBLOCK | O_NOCTTY : O_DIRECTORY);
        const int fd = ::openat(dir_fd, part.c_str(), flags);
        if (fd < 0) throw Error(SLIM_ERR_IO, "cannot open " + full + ": " + std::strerror(errno));
        if (last) {
            Fd file(fd);
            if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) not_regular(full, st.st_mode);
            ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
            *size = static_cast<int64_t>(st.st_size);
            file.fd = -1;
            return fd;
        }
        held = std::make_unique<Fd>(fd);
        dir_fd = fd;
    }
    throw Error(SLIM_ERR_BUNDLE, "'" + rel + "' is not a path inside the bundle");
}

std::string BundleDir::read(const std::string& rel, int64_t max_bytes) const {
    std::string bytes;
    read(rel, max_bytes, bytes);
    return bytes;
}

void BundleDir::read(const std::string& rel, int64_t max_bytes, std::string& bytes) const {
    int64_t size = 0;
    Fd fd(open_regular(rel, &size));
    const std::string full = path_ + "/" + rel;
    if (size > max_bytes)
        throw Error(SLIM_ERR_BUNDLE,
                    full + " is " + std::to_string(size) + " bytes, more than the " + std::to_string(max_bytes) + " allowed");
    // Grown only (zero-filling just the new part), then cut to size: a reused buffer is not rewritten first.
    const size_t want = static_cast<size_t>(size);
    if (bytes.size() < want) bytes.resize(want);
    size_t done = 0;
    while (done < want) {
        const ssize_t n = ::read(fd.fd, &bytes[done], want - done);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) throw Error(SLIM_ERR_IO, "cannot read " + full + ": " + std::strerror(errno));
        if (n == 0) throw Error(SLIM_ERR_IO, "cannot read " + full + ": it shrank while being read");
        done += static_cast<size_t>(n);
    }
    bytes.resize(want);
}

std::map<std::string, int64_t> BundleDir::files() const {
    std::map<std::string, int64_t> out;
    size_t entries = 0;
    walk(fd_, path_, "", 0, out, entries);
    return out;
}

std::string BundleDir::sha256(const std::string& rel, int64_t size, const std::function<void(size_t)>& on_chunk) const {
    int64_t actual = 0;
    Fd fd(open_regular(rel, &actual));
    if (actual != size)
        throw Error(SLIM_ERR_BUNDLE, "bundle file " + path_ + "/" + rel + " is " + std::to_string(actual) +
                                         " bytes but the manifest lists " + std::to_string(size) +
                                         " (it changed after export; re-export the bundle)");
    return sha256_fd(fd.fd, path_ + "/" + rel, on_chunk);
}

void check_listing(const BundleDir& dir, const Manifest& manifest) {
    std::map<std::string, int64_t> on_disk = dir.files();
    on_disk.erase(kManifestFile);
    on_disk.erase(kDigestFile);
    const std::string& root = dir.path();
    // The listing and every size, before any file is read.
    for (const FileEntry& f : manifest.files) {
        const auto found = on_disk.find(f.path);
        if (found == on_disk.end())
            throw Error(SLIM_ERR_BUNDLE,
                        "bundle file " + root + "/" + f.path + " is listed in the manifest but missing (re-export the bundle)");
        if (found->second != f.size)
            throw Error(SLIM_ERR_BUNDLE, "bundle file " + root + "/" + f.path + " is " + std::to_string(found->second) +
                                             " bytes but the manifest lists " + std::to_string(f.size) +
                                             " (it changed or was cut short after export; re-export the bundle)");
        on_disk.erase(found);
    }
    if (!on_disk.empty())
        throw Error(SLIM_ERR_BUNDLE,
                    root + "/" + on_disk.begin()->first +
                        " is not listed in the manifest: a bundle holds only the files its manifest lists (remove it, or "
                        "re-export the bundle)" +
                        (on_disk.size() > 1 ? " [and " + std::to_string(on_disk.size() - 1) + " more unlisted files]" : ""));
}

std::unordered_set<std::string> hashed_files(const Manifest& manifest, Verify level) {
    std::unordered_set<std::string> files;
    if (level == Verify::Full)
        for (const FileEntry& f : manifest.files) files.insert(f.path);
    for (const StageDecl& s : manifest.stages) files.insert(s.file);
    return files;
}

namespace {

void check_digest(const BundleDir& dir, const FileEntry& f, const std::string& actual) {
    if (actual != f.sha256)
        throw Error(SLIM_ERR_BUNDLE,
                    "checksum mismatch for " + dir.path() + "/" + f.path + " (the file changed after export; re-export the bundle)");
}

}  // namespace

void verify_files(const BundleDir& dir, const Manifest& manifest, Verify level, const VerifyProgress& progress) {
    check_listing(dir, manifest);
    const std::unordered_set<std::string> hashed = hashed_files(manifest, level);
    std::vector<const FileEntry*> to_hash;
    uint64_t total = 0, done = 0;
    for (const FileEntry& f : manifest.files) {
        if (hashed.count(f.path)) {
            to_hash.push_back(&f);
            total += static_cast<uint64_t>(f.size);
        }
    }
    for (const FileEntry* f : to_hash) {
        if (progress) progress(f->path, done, total);
        check_digest(dir, *f, dir.sha256(f->path, f->size, [&](size_t n) {
            done += n;
            if (progress) progress(f->path, done, total);
        }));
    }
}

BundleReader::BundleReader(const BundleDir& dir, const Manifest& manifest, Verify level)
    : dir_(dir), hashed_(hashed_files(manifest, level)) {
    check_listing(dir, manifest);
    for (const FileEntry& f : manifest.files) listed_[f.path] = &f;
    unread_ = listed_;
}

bool BundleReader::listed(const std::string& rel) const { return listed_.count(rel) > 0; }

std::string BundleReader::read(const std::string& rel) {
    std::string bytes;
    read(rel, bytes);
    return bytes;
}

void BundleReader::read(const std::string& rel, std::string& bytes) {
    const auto found = listed_.find(rel);
    if (found == listed_.end()) throw Error(SLIM_ERR_BUNDLE, "bundle file " + dir_.path() + "/" + rel + " is not listed in the manifest");
    const FileEntry& entry = *found->second;
    // read() refuses a file grown past its listed size; one cut short since the listing is caught here.
    dir_.read(rel, entry.size, bytes);
    if (static_cast<int64_t>(bytes.size()) != entry.size)
        throw Error(SLIM_ERR_BUNDLE, "bundle file " + dir_.path() + "/" + rel + " is " + std::to_string(bytes.size()) +
                                         " bytes but the manifest lists " + std::to_string(entry.size) +
                                         " (it changed after export; re-export the bundle)");
    if (hashed_.count(rel)) check_digest(dir_, entry, sha256_bytes(bytes));
    unread_.erase(rel);
}

void BundleReader::finish() {
    for (const auto& [rel, f] : unread_)
        if (hashed_.count(rel)) check_digest(dir_, *f, dir_.sha256(rel, f->size));
    unread_.clear();
}

}  // namespace slim
