#include "memory_bank.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <climits>
#include <csetjmp>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>

#include "error.hpp"

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace slim {
namespace {

// Layout (docs/memory-bank.md). Little-endian, every record at header + seq * record_bytes.
constexpr char kFileMagic[8] = {'S', 'L', 'I', 'M', 'B', 'A', 'N', 'K'};
constexpr uint32_t kFileVersion = 2;           // 2: write calls end at a record marked kEndOfCall; 1 (still read and written): no marks
constexpr uint32_t kRecordMagic = 0x52424C53;  // "SLBR"
constexpr uint32_t kUpsert = 1, kDelete = 2;
constexpr size_t kRecordHead = 40;  // magic, kind, seq, id, write_time, model_version, dim

struct FileHeader {
    char magic[8];
    uint32_t version, dim, record_bytes, header_bytes;
    int64_t created_us;
    uint8_t reserved[28];
    uint32_t crc;  // CRC-32C of the 60 bytes before it
};
static_assert(sizeof(FileHeader) == 64, "header is 64 bytes");

uint32_t crc32c_software(const uint8_t* p, size_t n) {
    static const auto table = [] {
        std::vector<uint32_t> t(256);
        for (uint32_t i = 0; i < 256; ++i) {
            uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
            t[i] = c;
        }
        return t;
    }();
    uint32_t c = 0xFFFFFFFFu;
    while (n--) c = table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(const uint8_t* p, size_t n) {
    uint64_t c = 0xFFFFFFFFu;
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t v;
        std::memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
    }
    uint32_t c32 = static_cast<uint32_t>(c);
    while (n--) c32 = _mm_crc32_u8(c32, *p++);
    return c32 ^ 0xFFFFFFFFu;
}
#endif

// CRC-32C (Castagnoli): the instruction where the CPU has it, the table otherwise; same values.
uint32_t crc32c(const uint8_t* p, size_t n) {
#if defined(__x86_64__)
    static const bool hardware = __builtin_cpu_supports("sse4.2");
    if (hardware) return crc32c_sse42(p, n);
#endif
    return crc32c_software(p, n);
}

uint64_t record_bytes_for(int dim) { return (kRecordHead + 4 * uint64_t(dim) + 4 + 7) / 8 * 8; }

// `p` holds n bytes and then their CRC-32C. Returns 0 when they match, 1 after flipping back the one bit
// (of the bytes or of the checksum) that explains the mismatch, -1 when no single bit does (p unchanged).
// The CRC is affine: crc(m ^ e) = crc(m) ^ crc0(e), crc0 without the initial and final inversions. For e one
// bit k bits before the end, crc0(e) is 1 shifted through the register k times; those values are distinct for
// every k up to the polynomial's period (far above a record's 2^21 bits), and none is a single bit (two flipped
// bits are always detected), so the bit is found by stepping the register once per bit of the record.
int correct_one_bit(uint8_t* p, size_t n) {
    uint32_t stored;
    std::memcpy(&stored, p + n, 4);
    const uint32_t syndrome = crc32c(p, n) ^ stored;
    if (syndrome == 0) return 0;
    if ((syndrome & (syndrome - 1)) == 0) {  // the flipped bit is in the stored checksum
        stored ^= syndrome;
        std::memcpy(p + n, &stored, 4);
        return 1;
    }
    uint32_t reg = 1;
    for (uint64_t k = 1; k <= 8 * uint64_t(n); ++k) {
        reg = (reg & 1) ? (reg >> 1) ^ 0x82F63B78u : reg >> 1;
        if (reg == syndrome) {  // bit (8 - k % 8) % 8 of the byte ceil(k / 8) from the end
            const uint64_t from_end = (k + 7) / 8;
            p[n - from_end] ^= static_cast<uint8_t>(1u << (8 * from_end - k));
            return 1;
        }
    }
    return -1;
}

FileHeader new_header(uint32_t version, int dim, int64_t created_us) {
    FileHeader h{};
    std::memcpy(h.magic, kFileMagic, 8);
    h.version = version;
    h.dim = static_cast<uint32_t>(dim);
    h.record_bytes = static_cast<uint32_t>(record_bytes_for(dim));
    h.header_bytes = sizeof(FileHeader);
    h.created_us = created_us;
    h.crc = crc32c(reinterpret_cast<const uint8_t*>(&h), offsetof(FileHeader, crc));
    return h;
}

int64_t now_us() {
    return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

uint64_t mix(uint64_t x) {  // splitmix64's finaliser: ids are often sequential
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// The index hash's key. The finaliser alone is invertible: ids could be computed whose hashes share
// their low bits, all in one probe run, making every call quadratic. Under a secret key they cannot.
uint64_t random_key() {
    uint64_t key = 0;
    if (::getrandom(&key, sizeof(key), GRND_NONBLOCK) != static_cast<ssize_t>(sizeof(key))) {  // no entropy yet: as good as we can
        static std::atomic<uint64_t> serial{0};
        key = mix(static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count()) ^
                  (static_cast<uint64_t>(::getpid()) << 32) ^ reinterpret_cast<uintptr_t>(&key) ^ serial++);
    }
    return key;
}

// Lookups read rows through a shared mapping of the file. When the file shrinks under it (another
// program truncates it, or a writer takes back records a reader had indexed), reading a page past the
// new end raises SIGBUS, which would kill the process. A lookup copies under a guard instead: a fault
// (a SIGBUS from the kernel) in its thread while the guard is set jumps back, and the lookup fails with
// SLIM_ERR_IO. Any other SIGBUS goes on to the handler installed before this one. (initial-exec: the handler must not
// allocate the thread-local.)
__attribute__((tls_model("initial-exec"))) thread_local sigjmp_buf* copy_guard = nullptr;
struct sigaction previous_sigbus{};

void on_sigbus(int sig, siginfo_t* info, void* context) {
    sigjmp_buf* guard = copy_guard;
    if (guard && info->si_code > 0) {  // a fault the kernel raised in this lookup's copy
        copy_guard = nullptr;
        siglongjmp(*guard, 1);
    }
    // A SIGBUS sent by a process or thread (kill, pthread_kill, raise: si_code <= 0) is not the copy's
    // fault, even when it lands in a lookup: it goes to the previous handler. With no previous handler it
    // is dropped during a copy: a handler installed after ours (faulthandler) re-raises a fault it saw
    // with raise(), and the copy's fault then comes back to us from the kernel.
    const bool previous_is_a_function =
        (previous_sigbus.sa_flags & SA_SIGINFO) || (previous_sigbus.sa_handler != SIG_DFL && previous_sigbus.sa_handler != SIG_IGN);
    if (guard && !previous_is_a_function) return;
    if (previous_sigbus.sa_flags & SA_SIGINFO) {
        previous_sigbus.sa_sigaction(sig, info, context);
    } else if (previous_sigbus.sa_handler != SIG_DFL && previous_sigbus.sa_handler != SIG_IGN) {
        previous_sigbus.sa_handler(sig);
    } else if (previous_sigbus.sa_handler == SIG_DFL || info->si_code > 0) {  // a fault cannot be ignored: the default, the process ends
        struct sigaction fallback{};
        fallback.sa_handler = SIG_DFL;
        ::sigaction(SIGBUS, &fallback, nullptr);
        ::raise(SIGBUS);
    }
}

void install_sigbus_guard() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction action{};
        action.sa_sigaction = on_sigbus;
        action.sa_flags = SA_SIGINFO | SA_NODEFER;  // NODEFER: SIGBUS is not left blocked after the jump out
        sigemptyset(&action.sa_mask);
        ::sigaction(SIGBUS, &action, &previous_sigbus);
    });
}

[[noreturn]] void io_error(const std::string& path, const std::string& what, int err = 0) {
    throw Error(SLIM_ERR_IO, "memory bank " + path + ": " + what + (err ? std::string(" (") + std::strerror(err) + ")" : ""));
}

void fsync_parent(const std::string& path) {
    std::string dir = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/'));
    int fd = ::open(dir.empty() ? "/" : dir.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ::fsync(fd);
        ::close(fd);
    }
}

// The name of a temporary file (`what`: tmp, repair) beside the bank file `path`: PATH.WHAT-..., or, where that
// would be longer than a file name may be, DIR/.slimbank-WHAT-HASH-... (HASH: of the bank's name, so that no
// other bank's temporaries share the prefix). Returns the path up to the '-' after which the caller's unique part goes.
std::string temporary_prefix(const std::string& path, const char* what) {
    const size_t slash = path.rfind('/'), start = slash == std::string::npos ? 0 : slash + 1;
    const std::string name = path.substr(start);
    if (name.size() + 48 <= NAME_MAX) return path + "." + what + "-";
    uint64_t h = 0xCBF29CE484222325ull;  // FNV-1a
    for (const char c : name) h = (h ^ static_cast<uint8_t>(c)) * 0x100000001B3ull;
    char hex[17];
    std::snprintf(hex, sizeof(hex), "%016llx", static_cast<unsigned long long>(h));
    return path.substr(0, start) + ".slimbank-" + what + "-" + hex + "-";
}

// Removes the temporaries a repair killed mid-run left: names of `prefix` (a temporary_prefix) then only digits, hex
// and '-'. Called under the bank's writer lock, so no repair of this bank is running.
void remove_stale_temporaries(const std::string& prefix_path) {
    const size_t start = prefix_path.rfind('/') + 1;  // npos + 1 == 0
    const std::string prefix = prefix_path.substr(start);
    DIR* d = ::opendir(start ? prefix_path.substr(0, start).c_str() : ".");
    if (!d) return;
    while (const dirent* e = ::readdir(d)) {
        const std::string name(e->d_name);
        if (name.size() > prefix.size() && name.compare(0, prefix.size(), prefix) == 0 &&
            std::all_of(name.begin() + prefix.size(), name.end(), [](char c) { return std::isxdigit(c) || c == '-'; }))
            ::unlinkat(::dirfd(d), name.c_str(), 0);
    }
    ::closedir(d);
}

// A new bank file appears complete or not at all: the header goes to a temporary file, is synced, then renamed.
void create_file(const std::string& path, int dim) {
    const FileHeader h = new_header(kFileVersion, dim, now_us());
    static std::atomic<uint64_t> serial{0};  // distinct temporary names for threads of one process too
    const std::string tmp = temporary_prefix(path, "tmp") + std::to_string(::getpid()) + "-" + std::to_string(serial++);
    int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) io_error(path, "cannot create", errno);
    bool ok = ::write(fd, &h, sizeof(h)) == static_cast<ssize_t>(sizeof(h)) && ::fsync(fd) == 0;
    int err = errno;
    ::close(fd);
    // link, not rename: when two writers create the same bank at once, the second finds the first's
    // file (EEXIST) and opens it, instead of replacing a file the first has already written to.
    if (ok && ::link(tmp.c_str(), path.c_str()) != 0 && errno != EEXIST) {
        ok = false;
        err = errno;
    }
    ::unlink(tmp.c_str());
    if (!ok) io_error(path, "cannot create", err);
    fsync_parent(path);
}

}  // namespace

struct MemoryBank::RecordHead {
    uint32_t magic, kind;
    uint64_t seq;
    int64_t id, write_time_us;
    uint32_t model_version, dim;
};
static_assert(sizeof(MemoryBank::RecordHead) == kRecordHead, "record head is 40 bytes");

MemoryBank::MemoryBank(const std::string& path, const BankOptions& options) : MemoryBank(path, options, nullptr) {}

MemoryBank::MemoryBank(const std::string& path, const BankOptions& options, BankRepair* repair)
    : path_(path),
      read_only_(options.read_only),
      sync_writes_(options.sync_writes),
      owner_pid_(::getpid()),
      hash_key_(random_key()),
      repair_(repair) {
    if (options.dim < 0 || options.dim > kMaxDim)
        throw Error(SLIM_ERR_INVALID_ARGUMENT, "memory bank: dim must be in [1, " + std::to_string(kMaxDim) + "]");
    struct stat st{};
    // A repair renames a new file over the bank while it holds the lock: a writer that opened the old file just
    // before would lock it just after, and write to a file no path names. So a writer checks that the path still
    // names the file it locked, and opens again if not.
    for (int attempt = 0;; ++attempt) {
        if (::stat(path.c_str(), &st) != 0) {
            if (errno != ENOENT) io_error(path, "cannot open", errno);
            if (read_only_ || !options.create) io_error(path, "does not exist", ENOENT);
            if (options.dim <= 0) throw Error(SLIM_ERR_INVALID_ARGUMENT, "memory bank " + path + ": dim is required to create a new bank");
            create_file(path, options.dim);
        }
        // O_NONBLOCK: a reader's open of a FIFO would wait for a writer forever (a regular file ignores the flag).
        fd_ = ::open(path.c_str(), (read_only_ ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NONBLOCK);
        if (fd_ < 0) io_error(path, "cannot open", errno);
        if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
            ::close(fd_);
            io_error(path, "is not a regular file (a directory, FIFO or device)");
        }
        if (read_only_) break;
        if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
            const int err = errno;
            ::close(fd_);
            io_error(path,
                     err == EWOULDBLOCK ? "is already open for writing (one writer per bank; open readers with read_only)" : "cannot lock",
                     err == EWOULDBLOCK ? 0 : err);
        }
        struct stat named{};
        if (::stat(path.c_str(), &named) == 0 && named.st_dev == st.st_dev && named.st_ino == st.st_ino) break;
        ::close(fd_);
        if (attempt == 9) io_error(path, "was replaced by another file each time it was opened (10 times)");
    }
    try {
        if (::fstat(fd_, &st) != 0) io_error(path, "cannot stat", errno);
        const uint64_t size = static_cast<uint64_t>(st.st_size);
        // One flipped bit in the header is corrected in memory (the file is left as it is; repair rewrites it).
        FileHeader h{};
        const bool whole = ::pread(fd_, &h, sizeof(h), 0) == static_cast<ssize_t>(sizeof(h));
        const bool magic = whole && std::memcmp(h.magic, kFileMagic, 8) == 0;
        const int fix = whole ? correct_one_bit(reinterpret_cast<uint8_t*>(&h), offsetof(FileHeader, crc)) : -1;
        if (fix < 0 || std::memcmp(h.magic, kFileMagic, 8) != 0) {
            if (!repair_ && !magic) io_error(path, "is not a slimengine memory bank (bad magic)");
            if (!repair_)
                io_error(path,
                         "header is damaged beyond correction (its checksum does not match, and no single flipped bit explains "
                         "it): run `slimengine bank repair " +
                             path + "`, which rebuilds it from the records");
            repair_->header = 2;
            header_from_records(size, magic);
        } else {
            recovery_.header_corrected = fix == 1;
            if (repair_) repair_->header = fix;
            if (h.version != 1 && h.version != kFileVersion)
                io_error(path, "format version " + std::to_string(h.version) + " is not supported (this runtime reads versions 1 and 2)");
            if (h.dim < 1 || h.dim > static_cast<uint32_t>(kMaxDim) || h.record_bytes != record_bytes_for(h.dim) ||
                h.header_bytes != kHeaderBytes)
                io_error(path, "header has an invalid dim or record size");
            marked_calls_ = h.version >= 2;
            dim_ = static_cast<int>(h.dim);
            record_bytes_ = h.record_bytes;
            created_us_ = h.created_us;
        }
        if (options.dim > 0 && options.dim != dim_)
            throw Error(SLIM_ERR_SHAPE, "memory bank " + path + " holds " + std::to_string(dim_) + "-d embeddings, not " +
                                            std::to_string(options.dim) + "-d");
        install_sigbus_guard();
        slots_.assign(1024, Slot{kEmpty, 0});
        map_at_least(size);
        const uint64_t end = scan(size);
        recovery_.tail_bytes = size - end;
        if (repair_) {  // the file is left as it is: rewrite() replaces it
            repair_->records = records_;
            repair_->tail_bytes = recovery_.tail_bytes;
            return;
        }
        // A writer cuts off what a crash left after the last whole call (an unfinished call, a torn
        // record), and appends after it. A reader keeps an unfinished call's records for its next refresh.
        if (!read_only_) drop_span();
        if (!read_only_ && end < size) {
            if (::ftruncate(fd_, static_cast<off_t>(end)) != 0 || ::fsync(fd_) != 0) io_error(path, "cannot truncate a torn tail", errno);
        }
    } catch (...) {
        if (map_) ::munmap(map_, map_bytes_);
        ::close(fd_);
        throw;
    }
}

MemoryBank::~MemoryBank() {
    if (map_) ::munmap(map_, map_bytes_);
    if (fd_ >= 0) ::close(fd_);  // releases the writer's lock (in a forked child: only its reference to it)
}

BankRecovery MemoryBank::recovery() const {
    std::shared_lock lock(index_mutex_);
    return recovery_;
}

void MemoryBank::map_at_least(uint64_t bytes) {
    if (bytes <= map_bytes_) return;
    const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    auto pages = [&](uint64_t b) { return (b + page - 1) / page * page; };
    // Twice what is needed where the address space allows: a growing file is then mapped again only
    // each time it doubles. Pages past the end of the file are never touched (the index only names
    // complete records), so the reservation costs address space, not memory.
    for (uint64_t want : {pages(std::max(kMinMapBytes, 2 * bytes)), pages(bytes)}) {
        void* map = map_ ? ::mremap(map_, map_bytes_, want, MREMAP_MAYMOVE) : ::mmap(nullptr, want, PROT_READ, MAP_SHARED, fd_, 0);
        if (map != MAP_FAILED) {
            map_ = static_cast<uint8_t*>(map);
            map_bytes_ = want;
            return;
        }
    }
    io_error(path_, "cannot map " + std::to_string(bytes) + " bytes", errno);
}

void MemoryBank::map_records(uint64_t records) {
    const uint64_t end = kHeaderBytes + records * record_bytes_;
    if (end <= map_bytes_) return;        // map_bytes_ changes only under write_mutex_, which the caller holds
    std::unique_lock lock(index_mutex_);  // lookups read through the mapping: none runs while it moves
    map_at_least(end);
}

void MemoryBank::check_writable() const {
    if (read_only_) throw Error(SLIM_ERR_INVALID_ARGUMENT, "memory bank " + path_ + " is open read-only");
    const pid_t pid = ::getpid();
    if (pid != owner_pid_)
        throw Error(SLIM_ERR_INVALID_ARGUMENT,
                    "memory bank " + path_ + " was opened by pid " + std::to_string(owner_pid_) + "; this is pid " + std::to_string(pid) +
                        ", a process forked from it, which may not write through the handle it inherited (both would append at the "
                        "same offsets). In a forked process open the bank again (read_only for a reader; one writer per bank), and "
                        "close the inherited handle: it holds the writer lock as long as it is open");
}

int64_t MemoryBank::count() const {
    std::shared_lock lock(index_mutex_);
    return static_cast<int64_t>(live_);
}

uint64_t MemoryBank::hash(int64_t id) const { return mix(static_cast<uint64_t>(id) ^ hash_key_); }

const MemoryBank::Slot* MemoryBank::find(int64_t id) const {
    if (id < 0) return nullptr;
    const size_t mask = slots_.size() - 1;
    for (size_t i = hash(id) & mask;; i = (i + 1) & mask) {
        const Slot& s = slots_[i];
        if (s.id == id) return &s;
        if (s.id == kEmpty) return nullptr;
    }
}

void MemoryBank::insert(int64_t id, uint64_t record) {
    if ((used_ + 1) * 10 > slots_.size() * 7) grow();
    const size_t mask = slots_.size() - 1;
    size_t reuse = SIZE_MAX;
    for (size_t i = hash(id) & mask;; i = (i + 1) & mask) {
        Slot& s = slots_[i];
        if (s.id == id) {
            s.record = record;
            return;
        }
        if (s.id == kDeleted && reuse == SIZE_MAX) reuse = i;
        if (s.id == kEmpty) {
            if (reuse == SIZE_MAX) {
                reuse = i;
                ++used_;
            }
            slots_[reuse] = Slot{id, record};
            ++live_;
            return;
        }
    }
}

bool MemoryBank::erase(int64_t id) {
    Slot* s = const_cast<Slot*>(find(id));
    if (!s) return false;
    s->id = kDeleted;
    --live_;
    return true;
}

void MemoryBank::grow() {
    size_t capacity = 1024;
    while (capacity < (live_ + 1) * 4) capacity *= 2;
    std::vector<Slot> old(capacity, Slot{kEmpty, 0});
    old.swap(slots_);
    used_ = live_ = 0;
    for (const Slot& s : old)
        if (s.id >= 0) insert(s.id, s.record);
}

uint64_t MemoryBank::scan(uint64_t size) {
    // Read with pread, not through the mapping: past the log, a writer may be truncating the file
    // (its open or close), and a read there must come back short instead of faulting.
    std::vector<uint8_t> chunk(std::max<uint64_t>(1, (uint64_t(4) << 20) / record_bytes_) * record_bytes_), fixed(record_bytes_);
    // A call's records are indexed together once its marked last record is found: a call cut short by
    // a crash, or still being written by another process, is not indexed at all. A record that fails
    // its checks does not end the log: every record sits at its own seq with its own checksum, so the
    // scan goes on, and the span from the last whole call to the next call end is dropped (end_span).
    uint64_t offset = kHeaderBytes + (records_ + span_) * record_bytes_;
    while (offset + record_bytes_ <= size) {
        const size_t want = static_cast<size_t>(std::min<uint64_t>(chunk.size(), (size - offset) / record_bytes_ * record_bytes_));
        ssize_t got;
        do got = ::pread(fd_, chunk.data(), want, static_cast<off_t>(offset));
        while (got < 0 && errno == EINTR);
        if (got < 0) io_error(path_, "cannot read", errno);  // not the end of the log: a writer must not truncate there
        const size_t whole = got > 0 ? static_cast<size_t>(got) / record_bytes_ * record_bytes_ : 0;
        for (size_t at = 0; at < whole; at += record_bytes_) {
            const uint8_t* r = chunk.data() + at;
            const uint64_t position = records_ + span_;
            RecordHead h;
            uint32_t crc;
            ++span_;
            const Verdict verdict = inspect(r, position, &h, &crc, fixed.data());
            if (verdict == Verdict::kDamaged) {
                if (span_damaged_++ == 0) span_first_damaged_ = position;  // torn, or damaged: the next records tell which
                continue;
            }
            const bool upsert = (h.kind & ~kEndOfCall) == kUpsert;
            if (verdict == Verdict::kCorrected) {
                if (span_corrected_++ == 0) span_first_corrected_ = position;
                if (repair_)
                    corrected_[position] = fixed;
                else if (upsert)  // lookups read the file, where its bytes are still damaged: its id is hidden until rewritten
                    pending_hidden_.push_back(pending_.size());
            }
            pending_.push_back(upsert ? h.id : -1 - h.id);
            pending_crc_ = crc;
            if (marked_calls_ && !(h.kind & kEndOfCall)) continue;
            if (span_damaged_ && !damage_persists()) {  // read while a writer rewrote those records: not damage, read again later
                drop_span();
                return kHeaderBytes + records_ * record_bytes_;
            }
            end_span(crc);
        }
        offset += whole;
        if (whole < want) break;  // the file ended early (truncated while we read)
    }
    if (span_damaged_ && tail_is_damage()) end_span(pending_crc_);  // refuses (repair: hides what it may have deleted)
    if (span_damaged_) drop_span();
    return kHeaderBytes + records_ * record_bytes_;
}

bool MemoryBank::tail_is_damage() {
    // Damaged records with no valid call end after them. A crash mid-append leaves a short last record (never
    // scanned) or zeros (ext4 data=ordered never shows stale bytes past the old size): a torn tail, left out. A
    // whole record holding anything else was written whole and damaged since: which id it wrote or deleted is
    // unknown, as inside the log. A reader may also have read a call another process is still writing: while a
    // writer holds the lock that is left for a later refresh; with none, the file cannot change while it is read again.
    if (read_only_ && ::flock(fd_, LOCK_SH | LOCK_NB) != 0) return false;
    bool written = false;
    const bool damage = damaged_now(&written) > 0 && written;
    if (read_only_) ::flock(fd_, LOCK_UN);
    return damage;
}

void MemoryBank::drop_span() {
    pending_.clear();
    pending_hidden_.clear();
    span_ = span_damaged_ = span_corrected_ = 0;
}

MemoryBank::Verdict MemoryBank::inspect(const uint8_t* r, uint64_t position, RecordHead* h, uint32_t* crc, uint8_t* fixed) const {
    if (valid_record(r, position, h, crc)) return Verdict::kIntact;
    // Bit rot flips one bit far more often than several. Only a record whose magic and seq are each within one
    // flipped bit of their own is searched: a torn record or garbage is not worth it.
    RecordHead raw;
    std::memcpy(&raw, r, sizeof(raw));
    if (__builtin_popcount(raw.magic ^ kRecordMagic) + __builtin_popcountll(raw.seq ^ position) > 1) return Verdict::kDamaged;
    const size_t payload = kRecordHead + 4 * static_cast<size_t>(dim_);
    std::memcpy(fixed, r, payload + 4);
    uint32_t fixed_crc;
    if (correct_one_bit(fixed, payload) != 1 || !valid_record(fixed, position, h, &fixed_crc)) return Verdict::kDamaged;
    std::memcpy(crc, r + payload, 4);  // the checksum as the file holds it: what a refresh compares
    return Verdict::kCorrected;
}

void MemoryBank::header_from_records(uint64_t size, bool magic) {
    // The first intact record found gives the width: its magic, a dim whose record size puts its seq at its
    // offset, and its checksum. Records sit at multiples of 8 bytes.
    std::vector<uint8_t> r;
    for (uint64_t at = kHeaderBytes; dim_ == 0 && at + kRecordHead <= size; at += 8) {
        RecordHead h;
        if (::pread(fd_, &h, sizeof(h), static_cast<off_t>(at)) != static_cast<ssize_t>(sizeof(h))) break;
        if (h.magic != kRecordMagic || h.dim < 1 || h.dim > static_cast<uint32_t>(kMaxDim)) continue;
        const uint64_t rb = record_bytes_for(static_cast<int>(h.dim)), payload = kRecordHead + 4 * uint64_t(h.dim);
        if (h.seq > size / rb || kHeaderBytes + h.seq * rb != at || at + rb > size) continue;
        r.resize(rb);
        uint32_t crc;
        if (::pread(fd_, r.data(), rb, static_cast<off_t>(at)) != static_cast<ssize_t>(rb)) continue;
        std::memcpy(&crc, r.data() + payload, 4);
        if (crc != crc32c(r.data(), payload)) continue;
        dim_ = static_cast<int>(h.dim);
        record_bytes_ = rb;
    }
    if (dim_ == 0 && !magic) io_error(path_, "is not a memory bank (no bank header and no intact record)");
    if (dim_ == 0)
        io_error(path_, "the header is damaged beyond correction, and no intact record was found to rebuild it from (nothing to recover)");
    // Format 2 marks the last record of every call; format 1 has no marks (read as format 2, it would be one unfinished call).
    marked_calls_ = true;
    bool marked = false;
    for (uint64_t i = 0; !marked && kHeaderBytes + (i + 1) * record_bytes_ <= size; ++i) {
        RecordHead h;
        uint32_t crc;
        marked = ::pread(fd_, r.data(), record_bytes_, static_cast<off_t>(kHeaderBytes + i * record_bytes_)) ==
                     static_cast<ssize_t>(record_bytes_) &&
                 valid_record(r.data(), i, &h, &crc) && (h.kind & kEndOfCall);
    }
    marked_calls_ = marked;
    created_us_ = now_us();
}

bool MemoryBank::valid_record(const uint8_t* r, uint64_t position, RecordHead* h, uint32_t* crc) const {
    const size_t payload = kRecordHead + 4 * static_cast<size_t>(dim_);
    std::memcpy(h, r, sizeof(*h));
    std::memcpy(crc, r + payload, 4);
    const uint32_t kind = h->kind & ~(marked_calls_ ? kEndOfCall : 0);
    return h->magic == kRecordMagic && (kind == kUpsert || kind == kDelete) && h->seq == position &&
           h->dim == static_cast<uint32_t>(dim_) && h->id >= 0 && *crc == crc32c(r, payload);
}

bool MemoryBank::damage_persists() const {
    // A scan can read a record half before and half after a writer took its failed call back and wrote
    // another in its place (a read is not atomic against writes). Real damage is still there when read again.
    return damaged_now(nullptr) == static_cast<int64_t>(span_damaged_);
}

int64_t MemoryBank::damaged_now(bool* written) const {
    // The span's damaged records, read again from the first of them; -1 when the file was cut back meanwhile.
    // `written`: one of them is not all zeros.
    const uint64_t end = records_ + span_;
    std::vector<uint8_t> chunk(std::min<uint64_t>(end - span_first_damaged_, std::max<uint64_t>(1, (uint64_t(4) << 20) / record_bytes_)) *
                               record_bytes_),
        fixed(record_bytes_);
    int64_t damaged = 0;
    for (uint64_t position = span_first_damaged_; position < end;) {
        const uint64_t n = std::min<uint64_t>(end - position, chunk.size() / record_bytes_);
        const ssize_t want = static_cast<ssize_t>(n * record_bytes_);
        ssize_t got;
        do got = ::pread(fd_, chunk.data(), static_cast<size_t>(want), static_cast<off_t>(kHeaderBytes + position * record_bytes_));
        while (got < 0 && errno == EINTR);
        if (got < 0) io_error(path_, "cannot read", errno);
        if (got != want) return -1;
        for (uint64_t i = 0; i < n; ++i, ++position) {
            const uint8_t* r = chunk.data() + i * record_bytes_;
            RecordHead h;
            uint32_t crc;
            if (inspect(r, position, &h, &crc, fixed.data()) != Verdict::kDamaged) continue;
            ++damaged;
            if (written && !*written) *written = std::any_of(r, r + record_bytes_, [](uint8_t b) { return b != 0; });
        }
    }
    return damaged;
}

void MemoryBank::end_span(uint32_t crc) {
    if (span_corrected_) {
        recovery_.damaged_records += span_corrected_;
        if (recovery_.first_damaged_offset < 0)
            recovery_.first_damaged_offset = static_cast<int64_t>(kHeaderBytes + span_first_corrected_ * record_bytes_);
        if (repair_) repair_->corrected_records += span_corrected_;
    }
    if (span_damaged_) {
        // A record damaged beyond correction: its id and kind are unknown. Had it deleted an id, skipping it would
        // bring that document back, so opening refuses. Its kind (where its call ends) is unknown too: every valid
        // record from the last whole call to this call end goes with it.
        if (!repair_) {
            const uint64_t at = kHeaderBytes + span_first_damaged_ * record_bytes_;
            drop_span();
            io_error(path_, "the record at byte " + std::to_string(at) +
                                " is damaged beyond correction (more than one flipped bit): which id it wrote or deleted is unknown, and "
                                "opening could bring a deleted document back; run `slimengine bank repair " +
                                path_ + "` (docs/memory-bank.md, Damage)");
        }
        // repair(): any id live before it may be the one it deleted or replaced: none of them is kept.
        repair_->unreadable_records += span_damaged_;
        repair_->dropped_records += pending_.size();
        repair_->hidden_ids += live_;
        slots_.assign(slots_.size(), Slot{kEmpty, 0});
        live_ = used_ = 0;
    } else {  // a whole call (format 1: one record)
        const uint64_t first = records_ + span_ - pending_.size();
        size_t next_hidden = 0;
        for (size_t i = 0; i < pending_.size(); ++i) {
            const int64_t id = pending_[i] >= 0 ? pending_[i] : -1 - pending_[i];
            if (next_hidden < pending_hidden_.size() && pending_hidden_[next_hidden] == i) {
                ++next_hidden;
                erase(id);
                hidden_.insert(id);
                continue;
            }
            if (pending_[i] >= 0)
                insert(id, first + i);
            else
                erase(id);
            if (!hidden_.empty()) hidden_.erase(id);
        }
    }
    records_ += span_;
    drop_span();
    last_crc_ = crc;
}

void MemoryBank::rewrite() {
    std::vector<std::pair<uint64_t, int64_t>> live;  // (record, id), in the order they were written
    live.reserve(live_);
    for (const Slot& s : slots_)
        if (s.id >= 0) live.emplace_back(s.record, s.id);
    std::sort(live.begin(), live.end());
    // Beside the file it replaces (through a symlink: beside its target), synced, then renamed over it.
    char* real = ::realpath(path_.c_str(), nullptr);
    if (!real) io_error(path_, "cannot resolve", errno);
    const std::string target(real);
    std::free(real);
    struct stat st{};
    if (::fstat(fd_, &st) != 0) io_error(path_, "cannot stat", errno);
    const std::string prefix = temporary_prefix(target, "repair");
    remove_stale_temporaries(prefix);
    std::string tmp;
    int out = -1;
    for (int attempt = 0; out < 0 && attempt < 8; ++attempt) {  // a random part: a name left by a process of the same pid cannot collide
        char random[17];
        std::snprintf(random, sizeof(random), "%016llx", static_cast<unsigned long long>(random_key()));
        tmp = prefix + std::to_string(::getpid()) + "-" + random;
        out = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, st.st_mode & 07777);
        if (out < 0 && errno != EEXIST) break;
    }
    if (out < 0) io_error(tmp, "cannot create", errno);
    auto fail = [&](const char* what, int err) {
        ::close(out);
        ::unlink(tmp.c_str());
        io_error(tmp, what, err);
    };
    auto write_all = [&](const uint8_t* p, size_t n) {
        for (size_t done = 0; done < n;) {
            const ssize_t w = ::write(out, p + done, n - done);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) fail("write failed", w < 0 ? errno : ENOSPC);
            done += static_cast<size_t>(w);
        }
    };
    const FileHeader h = new_header(marked_calls_ ? kFileVersion : 1, dim_, created_us_);
    write_all(reinterpret_cast<const uint8_t*>(&h), sizeof(h));
    // One upsert per live id, each its own call: a later damaged record then costs no other.
    std::vector<uint8_t> source(record_bytes_), buffer;
    const size_t per_chunk = std::max<size_t>(1, (size_t(8) << 20) / record_bytes_);
    for (size_t first = 0; first < live.size(); first += per_chunk) {
        const size_t n = std::min(per_chunk, live.size() - first);
        buffer.assign(n * record_bytes_, 0);
        for (size_t i = 0; i < n; ++i) {
            const auto [record, id] = live[first + i];
            const auto corrected = corrected_.find(record);
            const uint8_t* r = source.data();
            if (corrected != corrected_.end())
                r = corrected->second.data();
            else if (::pread(fd_, source.data(), record_bytes_, static_cast<off_t>(kHeaderBytes + record * record_bytes_)) !=
                     static_cast<ssize_t>(record_bytes_))
                fail("cannot read the bank", errno);
            RecordHead head;
            std::memcpy(&head, r, sizeof(head));
            write_record(buffer.data() + i * record_bytes_, first + i, kUpsert | end_mark(0, 1), id, head.write_time_us, head.model_version,
                         reinterpret_cast<const float*>(r + kRecordHead));
        }
        write_all(buffer.data(), buffer.size());
    }
    if (::fsync(out) != 0) fail("fsync failed", errno);
    ::close(out);
    if (::rename(tmp.c_str(), target.c_str()) != 0) {
        const int err = errno;
        ::unlink(tmp.c_str());
        io_error(path_, "cannot replace it with the repaired bank", err);
    }
    fsync_parent(target);
}

BankRepair MemoryBank::repair(const std::string& path) {
    BankRepair report;
    BankOptions options;
    options.create = false;
    MemoryBank bank(path, options, &report);
    bank.rewrite();
    report.ids = bank.live_;
    return report;
}

void MemoryBank::append(size_t count, const std::function<void(uint8_t*, size_t)>& fill) {
    const uint64_t start = kHeaderBytes + records_ * record_bytes_;
    map_records(records_ + count);  // before any write: a failure leaves nothing written
    // Records are built in a reused staging buffer and written with pwrite: whole new page-cache
    // pages are filled by the copy, which costs far less than faulting zeroed pages into a mapping.
    const size_t per_chunk = std::max<size_t>(1, (size_t(8) << 20) / record_bytes_);
    staging_.resize(std::min(count, per_chunk) * record_bytes_);
    auto undo = [&](int err, const char* what) {
        if (::ftruncate(fd_, static_cast<off_t>(start)) != 0) {
        }  // best effort: whole records past the log would otherwise be kept, torn ones are dropped at the next open
        io_error(path_, std::string(what) + "; nothing was written", err);
    };
    // Reserve the blocks of the whole call at once (size unchanged): the filesystem then allocates one
    // extent instead of one per page, which dominated upserts on ext4. Best effort.
    (void)::fallocate(fd_, FALLOC_FL_KEEP_SIZE, static_cast<off_t>(start), static_cast<off_t>(count * record_bytes_));
    for (size_t first = 0; first < count; first += per_chunk) {
        const size_t n = std::min(per_chunk, count - first);
        for (size_t i = 0; i < n; ++i) fill(staging_.data() + i * record_bytes_, first + i);
        const size_t len = n * record_bytes_;
        const uint64_t at = start + first * record_bytes_;
        for (size_t done = 0; done < len;) {
            ssize_t w = ::pwrite(fd_, staging_.data() + done, len - done, static_cast<off_t>(at + done));
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0) undo(w < 0 ? errno : ENOSPC, "write failed");
            done += static_cast<size_t>(w);
        }
    }
    if (sync_writes_ && ::fdatasync(fd_) != 0) undo(errno, "fdatasync failed");
}

void MemoryBank::write_record(uint8_t* r, uint64_t seq, uint32_t kind, int64_t id, int64_t write_time_us, uint32_t model_version,
                              const float* embedding) {
    const size_t row = 4 * static_cast<size_t>(dim_), payload = kRecordHead + row;
    RecordHead h{kRecordMagic, kind, seq, id, write_time_us, model_version, static_cast<uint32_t>(dim_)};
    std::memcpy(r, &h, sizeof(h));
    if (embedding)
        std::memcpy(r + kRecordHead, embedding, row);
    else
        std::memset(r + kRecordHead, 0, row);
    const uint32_t crc = crc32c(r, payload);  // computed over the bytes as stored
    std::memcpy(r + payload, &crc, 4);
}

void MemoryBank::upsert(const int64_t* ids, const float* embeddings, size_t n, uint32_t model_version, int64_t write_time_us) {
    check_writable();
    std::lock_guard<std::mutex> writer(write_mutex_);
    append(n, [&](uint8_t* r, size_t i) {
        write_record(r, records_ + i, kUpsert | end_mark(i, n), ids[i], write_time_us, model_version,
                     embeddings + i * static_cast<size_t>(dim_));
    });
    std::unique_lock lock(index_mutex_);  // the records are complete: now readers may find them
    for (size_t i = 0; i < n; ++i) insert(ids[i], records_ + i);
    if (!hidden_.empty())
        for (size_t i = 0; i < n; ++i) hidden_.erase(ids[i]);
    records_ += n;
}

size_t MemoryBank::remove(const int64_t* ids, size_t n) {
    check_writable();
    std::lock_guard<std::mutex> writer(write_mutex_);
    const int64_t now = now_us();
    std::vector<int64_t> present(ids, ids + n);
    std::sort(present.begin(), present.end());
    present.erase(std::unique(present.begin(), present.end()), present.end());
    // Only the writer changes the index, so it can be read without the lock here. A hidden id (its newest record
    // corrected at open) is deleted too: repair would otherwise restore it.
    present.erase(std::remove_if(present.begin(), present.end(), [&](int64_t id) { return !find(id) && !hidden_.count(id); }),
                  present.end());
    if (present.empty()) return 0;
    const size_t visible = static_cast<size_t>(std::count_if(present.begin(), present.end(), [&](int64_t id) { return find(id); }));
    append(present.size(), [&](uint8_t* r, size_t i) {
        write_record(r, records_ + i, kDelete | end_mark(i, present.size()), present[i], now, 0, nullptr);
    });
    std::unique_lock lock(index_mutex_);
    for (int64_t id : present) {
        erase(id);
        hidden_.erase(id);
    }
    records_ += present.size();
    return visible;
}

size_t MemoryBank::lookup(const int64_t* ids, size_t n, float* out, int64_t* write_times, int64_t* model_versions) const {
    std::shared_lock lock(index_mutex_);
    sigjmp_buf guard;
    if (sigsetjmp(guard, 0) != 0)  // a SIGBUS in copy_rows: the file no longer holds a record the index names
        io_error(path_,
                 "the file is shorter than the records this handle has indexed (it was truncated under it, or a writer took "
                 "records back): call refresh() on a read-only handle, or open the bank again");
    // Bytes past a shrunk end that share the last page read as zeros instead of faulting: rows are
    // checked against the file's size (and their heads against the index) before they are returned.
    struct stat st{};
    if (::fstat(fd_, &st) != 0) io_error(path_, "cannot stat", errno);
    copy_guard = &guard;
    const size_t found = copy_rows(ids, n, out, write_times, model_versions, static_cast<uint64_t>(st.st_size));
    copy_guard = nullptr;
    if (found == kRecordGone)
        io_error(path_,
                 "a record this handle has indexed is no longer in the file (it was truncated or rewritten under it): call "
                 "refresh() on a read-only handle, or open the bank again");
    return found;
}

size_t MemoryBank::copy_rows(const int64_t* ids, size_t n, float* out, int64_t* write_times, int64_t* model_versions,
                             uint64_t file_size) const noexcept {
    const size_t mask = slots_.size() - 1, row = 4 * static_cast<size_t>(dim_);
    // Random ids miss every cache: a two-stage prefetch keeps many misses in flight, first the index
    // slot of a later id, then (once that slot is cached) the record it points to.
    constexpr size_t kSlotAhead = 16, kRecordAhead = 8;
    const size_t record_span = kRecordHead + row;
    size_t found = 0;
    for (size_t i = 0; i < n; ++i) {
        if (i + kSlotAhead < n && ids[i + kSlotAhead] >= 0) __builtin_prefetch(&slots_[hash(ids[i + kSlotAhead]) & mask]);
        if (i + kRecordAhead < n)
            if (const Slot* ahead = find(ids[i + kRecordAhead]))
                for (size_t line = 0; line < record_span; line += 64) __builtin_prefetch(record_at(ahead->record) + line);
        const Slot* s = find(ids[i]);
        if (!s) {
            if (out) std::memset(out + i * dim_, 0, row);
            if (write_times) write_times[i] = -1;
            if (model_versions) model_versions[i] = -1;
            continue;
        }
        const uint8_t* r = record_at(s->record);
        RecordHead h;
        std::memcpy(&h, r, sizeof(h));
        if (kHeaderBytes + (s->record + 1) * record_bytes_ > file_size || h.magic != kRecordMagic || h.seq != s->record || h.id != ids[i])
            return kRecordGone;
        if (out) std::memcpy(out + i * dim_, r + kRecordHead, row);
        if (write_times) write_times[i] = h.write_time_us;
        if (model_versions) model_versions[i] = h.model_version;
        ++found;
    }
    return found;
}

void MemoryBank::flush() {
    if (read_only_) return;
    check_writable();
    std::lock_guard<std::mutex> writer(write_mutex_);
    if (::fdatasync(fd_) != 0) io_error(path_, "fdatasync failed", errno);
}

bool MemoryBank::record_unchanged(uint64_t index, uint32_t crc, uint64_t size) const {
    const uint64_t at = kHeaderBytes + index * record_bytes_, crc_at = at + kRecordHead + 4 * static_cast<uint64_t>(dim_);
    uint32_t now = 0;
    return at + record_bytes_ <= size && ::pread(fd_, &now, 4, static_cast<off_t>(crc_at)) == 4 && now == crc;
}

size_t MemoryBank::refresh() {
    if (!read_only_) return 0;  // the one writer's index is always current
    std::lock_guard<std::mutex> writer(write_mutex_);
    struct stat st{};
    if (::fstat(fd_, &st) != 0) io_error(path_, "cannot stat", errno);
    const uint64_t size = static_cast<uint64_t>(st.st_size), before = records_;
    std::unique_lock lock(index_mutex_);
    map_at_least(size);
    // A writer takes records back only after a failed write, and may then write others in their place.
    // The checksum of the last record indexed (it holds its seq and write time) tells whether it is still there.
    if (records_ > 0 && !record_unchanged(records_ - 1, last_crc_, size)) {  // index again from the start
        slots_.assign(1024, Slot{kEmpty, 0});
        live_ = used_ = 0;
        records_ = 0;
        drop_span();
        hidden_.clear();
        const BankRecovery before_reindex = recovery_;
        recovery_ = BankRecovery{};
        recovery_.tail_bytes = before_reindex.tail_bytes;
        recovery_.header_corrected = before_reindex.header_corrected;
        scan(size);
        return records_;
    }
    if (span_ > 0 && !record_unchanged(records_ + span_ - 1, pending_crc_, size))
        drop_span();  // the unfinished call seen last time was taken back
    scan(size);
    return records_ - before;
}

}  // namespace slim
