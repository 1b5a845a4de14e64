// The LEMUR memory bank: document id -> (embedding, model version, write time), durable in one file.
//
// The file is an append-only log of fixed-size, checksummed records after a checksummed header
// (docs/memory-bank.md). The last record of each write call is marked, and a scan indexes a call's
// records only once it has found that mark: a crash (kill -9) loses at most the calls that had not
// returned, never part of one; a writer truncates that torn tail. Damage inside the log (bit rot) never
// brings a deleted id back: a record (or the header) with one flipped bit is corrected in memory (its
// checksum locates the bit) and reported (recovery()); a record damaged beyond that makes opening refuse
// until repair() rewrites the bank from what can be proven (docs/memory-bank.md, "Damage").
// The id -> record index lives in memory, under a per-bank random hash key; records are appended with
// pwrite (in the page cache once it returns: a killed process loses nothing it completed) and embeddings
// are read from a read-only shared mapping of the file, sized to the file and moved as it grows. One
// writer per file (an exclusive flock), usable only by the process that opened it; any number of
// read-only handles, in this process or others, pick up the writer's appends with refresh().
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace slim {

struct BankOptions {
    int dim = 0;  // required to create a bank; checked against an existing one when > 0
    bool read_only = false;
    bool create = true;
    bool sync_writes = false;  // fdatasync after every write call (power-loss durability)
};

// What MemoryBank::repair found and kept (docs/memory-bank.md, "Repair").
struct BankRepair {
    int header = 0;                   // 0 intact; 1 one flipped bit, corrected; 2 damaged beyond that, rebuilt from the records
    uint64_t records = 0;             // record positions up to the end of the last whole call
    uint64_t corrected_records = 0;   // records with one flipped bit: restored
    uint64_t unreadable_records = 0;  // records damaged beyond correction: their id and kind are unknown
    uint64_t dropped_records = 0;     // intact records of the write calls that held an unreadable record
    uint64_t hidden_ids = 0;          // ids left out because an unreadable record could have deleted or replaced them
    uint64_t ids = 0;                 // ids in the repaired bank
    uint64_t tail_bytes = 0;          // after the last whole call (a torn tail): left out
};

// What the scans of a handle found and left out (docs/memory-bank.md, "Damage").
struct BankRecovery {
    uint64_t damaged_records = 0;       // records inside the log with one flipped bit: corrected (a delete applied, an upsert's id hidden)
    int64_t first_damaged_offset = -1;  // byte offset of the first damaged record; -1: none
    uint64_t tail_bytes = 0;            // at open: bytes after the last whole call (a call a crash cut short); a writer truncated them
    bool header_corrected = false;      // the header had one flipped bit, corrected in memory
};

class MemoryBank {
  public:
    static constexpr int kMaxDim = 65536;
    static constexpr uint64_t kMinMapBytes = uint64_t(64) << 20;  // the smallest address range a handle reserves

    // Throws Error: IO (cannot create/open/lock, not a bank file, damage beyond correction), SHAPE (dim mismatch),
    // INVALID_ARGUMENT.
    MemoryBank(const std::string& path, const BankOptions& options);
    // Rewrites the bank at `path` (taking the writer lock) with one record per id it can prove live: every
    // corrected record restored, no deleted id, and, after a record damaged beyond correction, none of the ids
    // written before it (it could have deleted any of them). A header damaged beyond correction is rebuilt from
    // the records. The new file replaces the old one whole (written beside it, synced, renamed). Throws Error(IO).
    static BankRepair repair(const std::string& path);
    ~MemoryBank();
    MemoryBank(const MemoryBank&) = delete;
    MemoryBank& operator=(const MemoryBank&) = delete;

    int dim() const { return dim_; }
    bool read_only() const { return read_only_; }
    int64_t count() const;
    // Damage found by the scans (open; a read-only handle's refreshes), and the torn tail found at open.
    BankRecovery recovery() const;

    // Writes (upsert, remove, flush) throw Error(INVALID_ARGUMENT) on a read-only handle and in any
    // process but the one that opened the bank (a forked child would append at the parent's offsets).
    // Arguments are validated by the caller (ids >= 0, n * dim finite floats). Appends one record
    // per id; the index changes only once every record is complete.
    void upsert(const int64_t* ids, const float* embeddings, size_t n, uint32_t model_version, int64_t write_time_us);
    // Appends a deletion record for each present id; returns how many were present.
    size_t remove(const int64_t* ids, size_t n);
    // For each id: its embedding into out[i * dim] (zeros when missing), its write time (-1 when
    // missing) and model version (-1 when missing); either array may be null. Returns the found count.
    // Throws Error(IO) when the file has become shorter than the records the index names (truncated
    // under this handle): a read-only handle then refresh()es.
    size_t lookup(const int64_t* ids, size_t n, float* out, int64_t* write_times, int64_t* model_versions) const;
    void flush();
    // Read-only handles: index the calls appended since the last scan (all again from the start when
    // the writer took back records this handle had indexed); returns how many records.
    size_t refresh();

    struct RecordHead;  // a record's first 40 bytes (memory_bank.cpp)

  private:
    // repair(): the writer lock, a header rebuilt from the records where it must be, damage beyond
    // correction hides the ids before it instead of refusing, nothing truncated, corrected records kept.
    MemoryBank(const std::string& path, const BankOptions& options, BankRepair* repair);
    void rewrite();  // repair(): the proven state into a new file, renamed over the old one
    struct Slot {
        int64_t id;  // kEmpty, kDeleted or a document id (>= 0)
        uint64_t record;
    };
    static constexpr int64_t kEmpty = -1, kDeleted = -2;

    uint64_t hash(int64_t id) const;
    const Slot* find(int64_t id) const;
    void insert(int64_t id, uint64_t record);
    bool erase(int64_t id);
    void grow();
    void check_writable() const;
    // Maps at least `bytes` of the file (twice that where it can, so a growing file is mapped again
    // only now and then). Moves the mapping: the caller holds index_mutex_ exclusively, or constructs.
    void map_at_least(uint64_t bytes);
    // Writer: makes the mapping cover `records` records before they are written (exclusive lock if it moves).
    void map_records(uint64_t records);
    // lookup's copies out of the mapping, run under the SIGBUS guard; no C++ object with a destructor lives here.
    // Returns kRecordGone when an indexed record is past file_size or no longer the one indexed.
    static constexpr size_t kRecordGone = SIZE_MAX;
    size_t copy_rows(const int64_t* ids, size_t n, float* out, int64_t* write_times, int64_t* model_versions,
                     uint64_t file_size) const noexcept;
    // Whether record `index` is still in the file (of `size` bytes) with checksum `crc`.
    bool record_unchanged(uint64_t index, uint32_t crc, uint64_t size) const;
    // Validates the records after those already checked (records_ + span_) up to `size` and indexes
    // each whole call whose last record it finds; returns the end of the last whole call.
    uint64_t scan(uint64_t size);
    // The span of checked records ends at a valid record that ends its call: index it, or drop it whole
    // when it holds damaged records.
    void end_span(uint32_t crc);
    // Whether the record `r` read at `position` passes every check (fills its head and checksum).
    bool valid_record(const uint8_t* r, uint64_t position, RecordHead* h, uint32_t* crc) const;
    // Whether the record `r` is intact, or `fixed` (record_bytes_) now holds it with one flipped bit corrected
    // (fills its head), or it is damaged beyond that.
    enum class Verdict { kIntact, kCorrected, kDamaged };
    Verdict inspect(const uint8_t* r, uint64_t position, RecordHead* h, uint32_t* crc, uint8_t* fixed) const;
    // Whether the span's damaged records are still damaged when read again.
    bool damage_persists() const;
    // How many of the span's records are damaged when read again (-1: the file was cut back); `written`: one of them is not all zeros.
    int64_t damaged_now(bool* written) const;
    // Whether damaged records at the end of the file, with no call end after them, are damage rather than a torn tail.
    bool tail_is_damage();
    void drop_span();  // forgets the checked records after the last whole call
    // repair(), header damaged beyond correction: dim and format from the records (the first intact one; any call mark).
    void header_from_records(uint64_t size, bool magic);
    // Appends `count` records, fill(record, i) building each, after the log; throws Error(SLIM_ERR_IO)
    // with the file cut back (nothing written) on failure.
    void append(size_t count, const std::function<void(uint8_t*, size_t)>& fill);
    void write_record(uint8_t* at, uint64_t seq, uint32_t kind, int64_t id, int64_t write_time_us, uint32_t model_version,
                      const float* embedding);
    // The kind bits that mark record i of a call of n as its last (none in format 1).
    uint32_t end_mark(size_t i, size_t n) const { return marked_calls_ && i + 1 == n ? kEndOfCall : 0; }
    const uint8_t* record_at(uint64_t index) const { return map_ + kHeaderBytes + index * record_bytes_; }

    static constexpr uint64_t kHeaderBytes = 64;
    static constexpr uint32_t kEndOfCall = 0x100;  // or-ed into the kind of a write call's last record (format 2)
    std::string path_;
    int fd_ = -1;
    bool read_only_, sync_writes_;
    int dim_ = 0;
    uint64_t record_bytes_ = 0;
    pid_t owner_pid_ = 0;    // the process that opened the bank: the only one that may write through it
    uint64_t hash_key_ = 0;  // random per bank: ids cannot be chosen to collide in the index
    uint8_t* map_ = nullptr;
    uint64_t map_bytes_ = 0;
    uint64_t records_ = 0;       // record positions up to the end of the last whole call (dropped damaged spans included)
    uint64_t span_ = 0;          // positions checked after records_: an unfinished call's, or a damaged span's
    uint64_t span_damaged_ = 0;  // damaged records among them
    uint64_t span_first_damaged_ = 0;
    uint64_t span_corrected_ = 0, span_first_corrected_ = 0;  // records with one flipped bit among them
    std::vector<int64_t> pending_;                            // the span's valid records (id; -1 - id for a delete)
    std::vector<size_t> pending_hidden_;       // indices into pending_ of corrected upserts: their ids are hidden, not indexed
    uint32_t last_crc_ = 0, pending_crc_ = 0;  // checksums of the last indexed record and of the span's last record
    bool marked_calls_ = true;                 // format 2: calls end at a marked record; format 1: every record stands alone
    int64_t created_us_ = 0;                   // the header's creation time
    std::vector<uint8_t> staging_;             // writer: records on their way into the file
    BankRecovery recovery_;
    // Ids whose newest record is a corrected upsert: hidden (its bytes in the file are damaged) but not deleted,
    // so the writer's delete of one still writes a delete record (repair restores the corrected upsert).
    std::unordered_set<int64_t> hidden_;
    BankRepair* repair_ = nullptr;                                  // set while repair() scans
    std::unordered_map<uint64_t, std::vector<uint8_t>> corrected_;  // repair(): record index -> its corrected bytes

    mutable std::shared_mutex index_mutex_;  // readers share; the index update of a write is exclusive
    std::mutex write_mutex_;                 // one write (or refresh) at a time
    std::vector<Slot> slots_;
    size_t live_ = 0, used_ = 0;  // live ids; live + deleted slots
};

}  // namespace slim
