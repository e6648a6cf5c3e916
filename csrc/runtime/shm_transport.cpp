// Shared-memory transport. See shm_transport.h.
#include "runtime/shm_transport.h"

#include <fcntl.h>
#include <pthread.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <functional>
#include <algorithm>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

namespace ppfast {

namespace {

constexpr uint64_t kMagic = 0x7070666173747368ull;  // "ppfastsh"
constexpr int kSlots = 64;                          // messages in flight from one rank to another
constexpr uint32_t kFree = 0, kFull = 1;
constexpr size_t kMinSegment = 64 << 10;

// A slot's fields are written by the peer and are checked before they size a copy. (The
// hardening tests find a slot by its tag and rewrite the fields after it: keep their order.)
struct alignas(64) Slot {
  std::atomic<uint32_t> state;  // kFree or kFull; only the sender fills, only the receiver frees
  uint32_t pad;
  int64_t tag;
  uint64_t seq;       // order of the sender's messages on this lane
  uint64_t nbytes;
  uint64_t gen;       // generation of the slot's data segment holding the bytes
  uint64_t capacity;  // size of that segment
};

struct Lane {                           // messages from one rank to the inbox's owner
  alignas(64) std::atomic<uint32_t> freed;  // bumped when the owner frees a slot
  Slot slots[kSlots];
};

struct Inbox {
  std::atomic<uint64_t> magic;  // written last by the owner: the inbox is ready
  int32_t size, owner;
  int64_t pid;  // for messages only: in another PID namespace it names another process
  alignas(64) std::atomic<uint32_t> posted;      // bumped by a sender after filling a slot
  alignas(64) std::atomic<int32_t> aborted_by;  // -1, or the rank that gave up
  char why[512];
  Lane lanes[1];  // `size` of them

  static size_t bytes(int size) { return sizeof(Inbox) + (size - 1) * sizeof(Lane); }
};

long futex(std::atomic<uint32_t>* addr, int op, uint32_t val, const timespec* ts) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), op, val, ts, nullptr, 0);
}

void futex_wake(std::atomic<uint32_t>* addr) { futex(addr, FUTEX_WAKE, INT_MAX, nullptr); }

// Sleeps while *addr == seen, at most `us` microseconds (shared futex: other processes wake it).
void futex_wait(std::atomic<uint32_t>* addr, uint32_t seen, long us) {
  timespec ts{us / 1000000, (us % 1000000) * 1000};
  futex(addr, FUTEX_WAIT, seen, &ts);
}

std::string sys_error(const std::string& what) { return what + ": " + std::strerror(errno); }

// Whole-file write locks on open file descriptions (OFD locks). The kernel drops one when the
// last descriptor of its open file description closes, that is when its process dies, in
// whatever PID namespace that process lives; another process sees it through any descriptor
// of the same file, even after the name is unlinked. POSIX record locks conflict with them,
// flock() locks do not: transports.sweep() tests with the same OFD lock.
void whole_file(struct flock* fl) {
  std::memset(fl, 0, sizeof(*fl));
  fl->l_type = F_WRLCK;
  fl->l_whence = SEEK_SET;  // l_start = l_len = 0: the whole file, however long
}

// The descriptors that hold this process's locks. A child forked from it (a DataLoader worker)
// shares their open file descriptions, and with them the locks: a rank that died would look
// alive to its peers for as long as such a child lived. The child closes its copies at once
// (and is given none of the mappings, which hold them too: map_fd).
std::mutex locked_mu;
std::set<int>& locked_fds() {
  static std::set<int> fds;
  return fds;
}

// How many forks lie between this process and the one that ran the first lock_file(): a
// transport built under another count belongs to an ancestor.
std::atomic<uint32_t> forks_seen{0};

void close_locked_in_child() {
  for (int fd : locked_fds()) close(fd);
  locked_fds().clear();
  forks_seen.fetch_add(1, std::memory_order_relaxed);
  locked_mu.unlock();  // locked by the parent's prepare handler, before the fork
}

void watch_forks() {
  static std::once_flag once;
  std::call_once(once, [] {
    pthread_atfork([] { locked_mu.lock(); }, [] { locked_mu.unlock(); }, close_locked_in_child);
  });
}

bool lock_file(int fd) {
  struct flock fl;
  whole_file(&fl);
  if (fcntl(fd, F_OFD_SETLK, &fl) != 0) return false;
  watch_forks();
  std::lock_guard<std::mutex> lock(locked_mu);
  locked_fds().insert(fd);
  return true;
}

// Closes a descriptor that lock_file() locked, dropping the lock. In a forked child, which
// closed its copies when it began, a descriptor it no longer has is left alone: its number may
// name another file now.
void close_locked(int fd) {
  std::lock_guard<std::mutex> lock(locked_mu);
  if (locked_fds().erase(fd) > 0) close(fd);
}

// 1 when some other open file description holds a lock on fd's file, 0 when none does, -1 when
// the kernel cannot say.
int lock_held(int fd) {
  struct flock fl;
  whole_file(&fl);
  if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return -1;
  return fl.l_type != F_UNLCK ? 1 : 0;
}

// A mapped shared-memory object.
struct Mapping {
  void* ptr = nullptr;
  size_t bytes = 0;
  uint64_t gen = 0;
  std::string name;  // non-empty while this side may still have to unlink it
  int fd = -1;       // holds the lock that says the creator is alive; -1 when not the creator

  void unmap() {
    if (ptr != nullptr) munmap(ptr, bytes);
    ptr = nullptr;
    bytes = 0;
  }
  // Removes the name (if this side still has to) and then drops the lock that guarded it.
  void unlink_name() {
    if (!name.empty()) shm_unlink(name.c_str());
    forget_name();
  }
  // The name is gone or left to the peer: stop guarding it.
  void forget_name() {
    name.clear();
    if (fd >= 0) close_locked(fd);
    fd = -1;
  }
};

void* map_fd(int fd, size_t bytes, const std::string& name) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) throw TransportError(sys_error("mmap of " + name), false);
  // Not into a forked child: a mapping holds its open file description, and with it the lock
  // that says this rank lives, as a descriptor does (see locked_fds).
  madvise(p, bytes, MADV_DONTFORK);
  return p;
}

// Creates, sizes and locks a segment; returns its descriptor, which keeps the lock.
int create_segment(const std::string& name, size_t bytes) {
  int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd < 0 && errno == EEXIST) {
    // Left over by a run that died, the name is ours now; one that a live process still locks
    // is not (another user's, which we could not open, stays too: the retry then fails).
    const int old = shm_open(name.c_str(), O_RDWR, 0);
    const int held = old >= 0 ? lock_held(old) : 0;
    if (old >= 0) close(old);
    if (held == 1) {
      throw TransportError("shared-memory name " + name + " is in use by a live process", false);
    }
    shm_unlink(name.c_str());
    fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  }
  if (fd < 0) throw TransportError(sys_error("shm_open of " + name), false);
  if (!lock_file(fd)) {  // a new file: only a kernel without OFD locks refuses
    const std::string why = sys_error("cannot lock " + name);
    close(fd);
    shm_unlink(name.c_str());
    throw TransportError(why, false);
  }
  // Reserve the pages now: a full /dev/shm is then this error, not a SIGBUS at the memcpy.
  const int err = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
  if (err != 0) {
    close_locked(fd);
    shm_unlink(name.c_str());
    errno = err;
    throw TransportError(sys_error("cannot reserve " + std::to_string(bytes) + " bytes of " +
                                   "shared memory for " + name) +
                             " (/dev/shm is too small: give it more, e.g. docker run "
                             "--shm-size=8g, or use transport='c10d')",
                         false);
  }
  return fd;
}

// Opens an existing segment and fills *st; -1 while it does not exist yet. A segment that
// another user owns, or that group or others may open, is refused: whoever could write it
// could make this rank read or write out of bounds, or read what it sends.
int open_segment(const std::string& name, struct stat* st) {
  const int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) {
    if (errno == ENOENT) return -1;
    throw TransportError(sys_error("shm_open of " + name), false);
  }
  if (fstat(fd, st) != 0) {
    const std::string why = sys_error("fstat of " + name);
    close(fd);
    throw TransportError(why, false);
  }
  if (st->st_uid != geteuid() || (st->st_mode & 077) != 0) {
    close(fd);
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(st->st_mode & 07777));
    throw TransportError("refusing shared-memory segment " + name + ": owned by uid " +
                             std::to_string(st->st_uid) + " with mode " + mode +
                             ", but it must belong to this process's user (uid " +
                             std::to_string(geteuid()) +
                             ") and be closed to group and others (mode 0600); another user "
                             "or a stale file holds the name",
                         false);
  }
  return fd;
}

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

}  // namespace

struct PendingSend {
  at::Tensor tensor;  // contiguous
  int peer;
  int64_t tag;
  bool sent = false;
};

struct RecvOp {  // found by (source, tag) in ShmState::posted
  at::Tensor tensor;  // contiguous; released once filled
  bool done = false;
  std::string error;  // set instead of done when the message cannot be delivered
};

struct ShmState {
  std::string name;
  int rank, size;
  // forks_seen when it was built: under another count it is a forked child's copy, with
  // none of the mappings and nothing of its own to free
  uint32_t born = forks_seen.load(std::memory_order_relaxed);

  bool foreign() const { return born != forks_seen.load(std::memory_order_relaxed); }
  std::mutex mu;  // one rank's executor drives it from one thread; Python may call abort()
  Mapping own;    // this rank's inbox
  std::vector<Inbox*> inboxes;             // by rank; inboxes[rank] is ours
  std::vector<int> inbox_fds;              // by rank: where a peer's lock is seen (-1 for ours)
  std::vector<int64_t> pids;               // as each rank sees itself: for names and messages
  std::vector<uint64_t> next_seq;          // per destination
  std::vector<std::vector<Mapping>> out;   // [dst][slot] data segments this rank created
  std::vector<std::vector<Mapping>> in;    // [src][slot] data segments this rank mapped
  std::deque<std::shared_ptr<PendingSend>> queue;  // sends waiting for a free slot, in order
  // receives posted and not yet filled, by (source, tag), oldest first
  std::map<std::pair<int, int64_t>, std::deque<std::shared_ptr<RecvOp>>> posted;
  std::chrono::steady_clock::time_point next_alive_check;
  int guarded = 0;  // at least the data segments in out[][] whose descriptor guards a name

  Inbox* mine() { return inboxes[rank]; }

  // "/ppfast-<sender's pid>-<group>-<src>-<dst>-<slot>-<gen>". The source rank is in it
  // because ranks in different PID namespaces can have the same pid.
  std::string data_name(int src, int dst, int slot, uint64_t gen) const {
    char group[17];
    std::snprintf(group, sizeof(group), "%016zx", std::hash<std::string>{}(name));
    return "/ppfast-" + std::to_string(pids[src]) + "-" + group + "-" + std::to_string(src) +
           "-" + std::to_string(dst) + "-" + std::to_string(slot) + "-" + std::to_string(gen);
  }

  // Whether rank r's process still holds the lock on its inbox. Not its pid: that names
  // another process, or none, when r lives in another PID namespace (a container).
  bool alive(int r) const {
    return r == rank || inbox_fds[r] < 0 || lock_held(inbox_fds[r]) != 0;
  }

  // ------------------------------------------------------------------ sending

  // Closes the locked descriptor of every new data segment whose slot is free again: its
  // receiver has opened the segment and unlinked the name, so there is nothing left to guard.
  // Every slot, not only the one a send picks, so that none is kept longer than one message.
  void reap() {
    if (guarded == 0) return;
    int left = 0;
    for (int dst = 0; dst < size; ++dst) {
      if (dst == rank || inboxes[dst] == nullptr) continue;
      const Lane& lane = inboxes[dst]->lanes[rank];
      for (int i = 0; i < kSlots; ++i) {
        Mapping& seg = out[dst][i];
        if (seg.fd < 0) continue;
        if (lane.slots[i].state.load(std::memory_order_acquire) == kFree) {
          seg.forget_name();
        } else {
          left += 1;
        }
      }
    }
    guarded = left;
  }

  // Copies the message into a free slot of its lane; false when every slot is full.
  bool try_send(PendingSend& s) {
    Lane& lane = inboxes[s.peer]->lanes[rank];
    const size_t nbytes = s.tensor.nbytes();
    int pick = -1;
    for (int i = 0; i < kSlots; ++i) {  // a free slot whose segment is big enough, else any
      if (lane.slots[i].state.load(std::memory_order_acquire) != kFree) continue;
      if (out[s.peer][i].bytes >= nbytes) {
        pick = i;
        break;
      }
      if (pick < 0) pick = i;
    }
    if (pick < 0) return false;
    Slot& slot = lane.slots[pick];
    Mapping& seg = out[s.peer][pick];
    if (nbytes > 0 && seg.bytes < nbytes) {
      seg.unmap();
      seg.unlink_name();  // the receiver may never have opened it
      seg.gen += 1;
      const std::string seg_name = data_name(rank, s.peer, pick, seg.gen);
      const size_t bytes = round_up(std::max(nbytes, kMinSegment), 4096);
      const int fd = create_segment(seg_name, bytes);
      try {
        seg.ptr = map_fd(fd, bytes, seg_name);
      } catch (...) {
        close_locked(fd);
        shm_unlink(seg_name.c_str());
        throw;
      }
      // The descriptor stays open, locked, while the name exists: sweep() then leaves it.
      seg.bytes = bytes;
      seg.name = seg_name;
      seg.fd = fd;
      guarded += 1;
    }
    if (nbytes > 0) std::memcpy(seg.ptr, s.tensor.data_ptr(), nbytes);
    slot.tag = s.tag;
    slot.seq = next_seq[s.peer]++;
    slot.nbytes = nbytes;
    slot.gen = seg.gen;
    slot.capacity = seg.bytes;
    slot.state.store(kFull, std::memory_order_release);
    Inbox* box = inboxes[s.peer];
    box->posted.fetch_add(1, std::memory_order_release);
    futex_wake(&box->posted);
    s.sent = true;
    s.tensor = at::Tensor();
    return true;
  }

  // Delivers what arrived and posts queued sends that now find a slot. Caller holds mu.
  void progress() {
    reap();
    drain();
    while (!queue.empty()) {
      if (!try_send(*queue.front())) return;
      queue.pop_front();
    }
  }

  // ------------------------------------------------------------------ receiving

  // Hands every message waiting in this rank's inbox to its posted receive (a source's
  // messages with one tag in the order they were sent) and frees their slots, so a posted
  // receive takes its message whenever this rank touches the transport, in any order.
  void drain() {
    if (posted.empty()) return;
    for (int src = 0; src < size; ++src) {
      if (src == rank) continue;
      Lane& lane = mine()->lanes[src];
      std::pair<uint64_t, int> full[kSlots];
      int n = 0;
      for (int i = 0; i < kSlots; ++i) {
        if (lane.slots[i].state.load(std::memory_order_acquire) == kFull) {
          full[n++] = {lane.slots[i].seq, i};
        }
      }
      if (n == 0) continue;
      std::sort(full, full + n);
      for (int k = 0; k < n; ++k) {
        Slot& slot = lane.slots[full[k].second];
        auto it = posted.find({src, slot.tag});
        if (it == posted.end()) continue;
        std::shared_ptr<RecvOp> op = it->second.front();
        it->second.pop_front();
        if (it->second.empty()) posted.erase(it);
        deliver(src, full[k].second, *op);
        slot.state.store(kFree, std::memory_order_release);
        lane.freed.fetch_add(1, std::memory_order_release);
        futex_wake(&lane.freed);
      }
    }
  }

  // Copies slot `index` of src's lane into op's buffer, or sets op.error. The slot's fields
  // come from shared memory: they are read once and checked against each other and against
  // the segment they name before any byte is copied, so a corrupt slot fails this receive
  // instead of reading out of bounds.
  void deliver(int src, int index, RecvOp& op) {
    const Slot& slot = mine()->lanes[src].slots[index];
    const uint64_t nbytes = slot.nbytes, gen = slot.gen, capacity = slot.capacity;
    const size_t want = op.tensor.nbytes();
    Mapping& seg = in[src][index];
    auto fail = [&](const std::string& why) {
      op.error = why;
      op.tensor = at::Tensor();
    };
    auto from = [&] {
      return "rank " + std::to_string(src) + "'s message in slot " + std::to_string(index) +
             " (tag " + std::to_string(slot.tag) + ")";
    };
    if (nbytes != want) {
      if (nbytes > 0 && seg.gen != gen) {  // dropped unread: its name goes now
        shm_unlink(data_name(src, rank, index, gen).c_str());
      }
      fail("message of " + std::to_string(nbytes) + " bytes from rank " + std::to_string(src) +
           " does not fit a " + std::to_string(want) + "-byte receive buffer");
      return;
    }
    if (nbytes > 0) {
      std::string bad;
      if (gen == 0 || gen < seg.gen) {
        bad = "names data segment generation " + std::to_string(gen) + " (last mapped: " +
              std::to_string(seg.gen) + ")";
      } else if (capacity < nbytes) {
        bad = "claims " + std::to_string(nbytes) + " bytes in a " + std::to_string(capacity) +
              "-byte data segment";
      } else if (capacity % 4096 != 0 || capacity < kMinSegment) {
        bad = "gives its data segment a capacity of " + std::to_string(capacity) +
              " bytes, which no sender makes";
      } else if (seg.ptr != nullptr && seg.gen == gen && seg.bytes != capacity) {
        bad = "gives generation " + std::to_string(gen) + "'s data segment a capacity of " +
              std::to_string(capacity) + " bytes, but it was mapped with " +
              std::to_string(seg.bytes);
      }
      if (!bad.empty()) {
        fail(from() + " is corrupt: it " + bad);
        return;
      }
    }
    if (nbytes > 0 && (seg.ptr == nullptr || seg.gen != gen)) {
      seg.unmap();
      const std::string seg_name = data_name(src, rank, index, gen);
      struct stat st;
      int fd;
      try {
        fd = open_segment(seg_name, &st);
      } catch (const TransportError& e) {
        fail(from() + ": " + e.what());
        return;
      }
      if (fd < 0) {
        fail("rank " + std::to_string(src) + "'s data segment " + seg_name + " is missing");
        return;
      }
      shm_unlink(seg_name.c_str());  // both sides hold it now (or it is refused below)
      if (static_cast<uint64_t>(st.st_size) < capacity) {  // mapping past its end: SIGBUS
        close(fd);
        fail(from() + " is corrupt: it gives its data segment " + seg_name + " a capacity of " +
             std::to_string(capacity) + " bytes, but the segment has " +
             std::to_string(st.st_size));
        return;
      }
      try {
        seg.ptr = map_fd(fd, capacity, seg_name);
      } catch (const TransportError& e) {
        close(fd);
        fail(e.what());
        return;
      }
      close(fd);
      seg.bytes = capacity;
      seg.gen = gen;
    }
    // nbytes <= capacity == seg.bytes, the length of the mapping, checked above
    if (nbytes > 0) std::memcpy(op.tensor.data_ptr(), seg.ptr, nbytes);
    op.tensor = at::Tensor();
    op.done = true;
  }

  // ------------------------------------------------------------------ failure

  // Throws when a peer gave up or (checked every 100 ms) a peer's process is gone.
  void check_peers(int peer) {
    const int32_t by = mine()->aborted_by.load(std::memory_order_acquire);
    if (by >= 0) {
      // written by a peer: a rank number only when it is one
      const std::string who = by < size ? "rank " + std::to_string(by)
                                        : "an unknown rank (" + std::to_string(by) + ")";
      throw TransportError(who + " gave up: " +
                               std::string(mine()->why, strnlen(mine()->why, sizeof(mine()->why))),
                           false);
    }
    const auto now = std::chrono::steady_clock::now();
    if (now < next_alive_check) return;
    next_alive_check = now + std::chrono::milliseconds(100);
    if (!alive(peer)) {
      for (Mapping& seg : out[peer]) seg.unlink_name();  // what it never took, it never will
      throw TransportError("rank " + std::to_string(peer) + " (pid " +
                               std::to_string(pids[peer]) +
                               " in its own PID namespace) has exited or closed its "
                               "transport: its lock on its inbox is gone",
                           false);
    }
  }
};

namespace {

class ShmHandle : public Handle {
 public:
  // A send (pending != nullptr) or a receive (op != nullptr) with `peer`.
  ShmHandle(std::shared_ptr<ShmState> st, std::shared_ptr<PendingSend> pending,
            std::shared_ptr<RecvOp> op, int peer)
      : st_(std::move(st)), pending_(std::move(pending)), op_(std::move(op)), peer_(peer) {}

  bool done() override {
    if (finished_) return true;
    std::lock_guard<std::mutex> lock(st_->mu);
    return poll_locked();
  }

  void wait(std::chrono::milliseconds timeout) override {
    if (finished_) return;
    const auto start = std::chrono::steady_clock::now();
    const auto deadline = start + timeout;
    Inbox* box = pending_ ? st_->inboxes[peer_] : st_->mine();
    std::atomic<uint32_t>* word =
        pending_ ? &box->lanes[st_->rank].freed : &box->posted;
    for (int round = 0;; ++round) {
      const uint32_t seen = word->load(std::memory_order_acquire);
      bool queued;
      {
        std::lock_guard<std::mutex> lock(st_->mu);
        if (poll_locked()) return;
        st_->check_peers(peer_);
        queued = !st_->queue.empty();
      }
      const auto now = std::chrono::steady_clock::now();
      if (now > deadline) throw TransportError("timed out", true);
      if (now - start < std::chrono::microseconds(30)) {
        std::this_thread::yield();  // a message usually follows its peer's compute closely
        continue;
      }
      // Sleep until the peer posts (or frees a slot); wake every few ms to check for failure
      // and, while this rank has queued sends, for slots the other peers freed.
      futex_wait(word, seen, queued ? 1000 : 5000);
    }
  }

 private:
  bool poll_locked() {  // caller holds st_->mu
    st_->progress();
    if (pending_) {
      finished_ = pending_->sent;
    } else {
      if (!op_->error.empty()) throw TransportError(op_->error, false);
      finished_ = op_->done;
    }
    return finished_;
  }

  std::shared_ptr<ShmState> st_;
  std::shared_ptr<PendingSend> pending_;
  std::shared_ptr<RecvOp> op_;
  int peer_;
  bool finished_ = false;
};

}  // namespace

ShmTransport::ShmTransport(const std::string& name, int rank, int size)
    : rank_(rank), size_(size), state_(std::make_shared<ShmState>()) {
  if (name.empty() || name[0] != '/' || name.find('/', 1) != std::string::npos ||
      name.size() > 200) {
    throw std::invalid_argument("shared-memory name must be '/' followed by at most 199 "
                                "characters without '/', got '" + name + "'");
  }
  if (size < 1 || rank < 0 || rank >= size) {
    throw std::invalid_argument("rank " + std::to_string(rank) + " is outside a group of " +
                                std::to_string(size));
  }
  ShmState& st = *state_;
  st.name = name;
  st.rank = rank;
  st.size = size;
  st.inboxes.assign(size, nullptr);
  st.inbox_fds.assign(size, -1);
  st.pids.assign(size, 0);
  st.next_seq.assign(size, 0);
  st.out.assign(size, std::vector<Mapping>(kSlots));
  st.in.assign(size, std::vector<Mapping>(kSlots));
  const std::string own = name + "-in-" + std::to_string(rank);
  const size_t bytes = Inbox::bytes(size);
  // The descriptor stays open, locked, for the transport's life, after the name is gone too:
  // its lock is how the peers (and sweep()) tell that this rank is alive.
  const int fd = create_segment(own, bytes);
  try {
    st.own.ptr = map_fd(fd, bytes, own);  // zero-filled: all slots free
  } catch (...) {
    close_locked(fd);
    shm_unlink(own.c_str());
    throw;
  }
  st.own.name = own;
  st.own.bytes = bytes;
  st.own.fd = fd;
  auto* box = static_cast<Inbox*>(st.own.ptr);
  box->size = size;
  box->owner = rank;
  box->pid = getpid();
  box->aborted_by.store(-1);
  box->magic.store(kMagic, std::memory_order_release);
  st.inboxes[rank] = box;
  st.pids[rank] = box->pid;
}

void ShmTransport::connect(std::chrono::milliseconds timeout) {
  ShmState& st = *state_;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  const size_t bytes = Inbox::bytes(size_);
  for (int r = 0; r < size_; ++r) {
    if (st.inboxes[r] != nullptr) continue;
    const std::string name = st.name + "-in-" + std::to_string(r);
    void* p = nullptr;
    int fd = -1;
    for (;;) {
      struct stat info;
      fd = open_segment(name, &info);  // refuses a segment that is not this user's own
      if (fd >= 0 && static_cast<size_t>(info.st_size) >= bytes) {  // else not sized yet
        try {
          p = map_fd(fd, bytes, name);
        } catch (...) {
          close(fd);
          throw;
        }
        if (static_cast<Inbox*>(p)->magic.load(std::memory_order_acquire) == kMagic) break;
        munmap(p, bytes);
      }
      if (fd >= 0) close(fd);
      if (std::chrono::steady_clock::now() > deadline) {
        throw TransportError("rank " + std::to_string(r) + " did not create its inbox " + name +
                                 " in time: are all ranks on this host and using the same name?",
                             true);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    auto* box = static_cast<Inbox*>(p);
    if (box->size != size_ || box->owner != r) {
      munmap(p, bytes);
      close(fd);
      throw TransportError("inbox " + name + " belongs to another group (size " +
                               std::to_string(box->size) + ", owner " +
                               std::to_string(box->owner) + ")",
                           false);
    }
    st.inboxes[r] = box;
    st.inbox_fds[r] = fd;  // kept: the owner's lock on this file says whether it lives
    st.pids[r] = box->pid;
  }
}

void ShmTransport::unlink_names() {
  if (state_->foreign()) return;  // the parent's names
  std::lock_guard<std::mutex> lock(state_->mu);
  if (!state_->own.name.empty()) shm_unlink(state_->own.name.c_str());
  state_->own.name.clear();
}

ShmTransport::~ShmTransport() {
  ShmState& st = *state_;
  // A forked child's copy: the names, the slots and the descriptors are its parent's, and the
  // mappings never came with the fork (their addresses may hold something else here now). Not
  // even its mutex: another of the parent's threads may have held it at the fork.
  if (st.foreign()) return;
  std::lock_guard<std::mutex> lock(st.mu);
  // A data segment's name goes with whichever side is last to need it: the receiver unlinks it
  // when it maps it; a message still in flight is left to the receiver, which unlinks those
  // it never took when it goes.
  for (int dst = 0; dst < size_; ++dst) {
    for (int i = 0; i < kSlots; ++i) {
      Mapping& seg = st.out[dst][i];
      seg.unmap();
      if (seg.name.empty()) continue;
      Inbox* box = st.inboxes[dst];
      const bool in_flight = box != nullptr && box->lanes[rank_].slots[i].state.load() == kFull;
      if (in_flight && st.alive(dst)) {
        seg.forget_name();
      } else {
        seg.unlink_name();
      }
    }
  }
  Inbox* mine = st.inboxes[rank_];
  for (int src = 0; src < size_; ++src) {
    for (int i = 0; i < kSlots; ++i) {
      Mapping& seg = st.in[src][i];
      seg.unmap();
      const Slot& slot = mine->lanes[src].slots[i];
      if (src != rank_ && slot.state.load() == kFull && slot.nbytes > 0 && slot.gen != seg.gen) {
        shm_unlink(st.data_name(src, rank_, i, slot.gen).c_str());
      }
    }
  }
  const size_t bytes = Inbox::bytes(size_);
  for (int r = 0; r < size_; ++r) {
    if (r != rank_ && st.inboxes[r] != nullptr) munmap(st.inboxes[r], bytes);
    if (st.inbox_fds[r] >= 0) close(st.inbox_fds[r]);
  }
  st.own.unmap();
  st.own.unlink_name();  // and with its lock this rank is gone
  st.inboxes.clear();
}

static void check_tensor(const at::Tensor& t, const char* what) {
  if (!t.device().is_cpu()) {
    throw std::invalid_argument(std::string("the shared-memory transport moves CPU tensors; ") +
                                what + " a tensor on " + t.device().str() +
                                " (use the c10d transport with NCCL, or the in-process one)");
  }
}

// A forked child (a DataLoader worker) holds a copy of its parent's transport, without the
// mappings (map_fd): using it would touch memory the child does not have.
static void check_owner(const ShmState& st) {
  if (st.foreign()) {
    throw std::runtime_error("this shared-memory transport belongs to the process that forked "
                             "this one: a forked child cannot send, receive or abort through "
                             "it; build a transport in the child, or use it from the parent");
  }
}

static void check_peer(int peer, int rank, int size) {
  if (peer < 0 || peer >= size || peer == rank) {
    throw std::invalid_argument("peer " + std::to_string(peer) + " is not another rank of this " +
                                std::to_string(size) + "-rank group (this is rank " +
                                std::to_string(rank) + ")");
  }
}

std::shared_ptr<Handle> ShmTransport::send(const at::Tensor& tensor, int peer, int64_t tag) {
  check_owner(*state_);
  check_tensor(tensor, "cannot send");
  check_peer(peer, rank_, size_);
  auto pending = std::make_shared<PendingSend>();
  pending->tensor = tensor.contiguous();
  pending->peer = peer;
  pending->tag = tag;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    ShmState& st = *state_;
    st.progress();
    if (!(st.queue.empty() && st.try_send(*pending))) st.queue.push_back(pending);
  }
  return std::make_shared<ShmHandle>(state_, pending, nullptr, peer);
}

std::shared_ptr<Handle> ShmTransport::recv(const at::Tensor& tensor, int peer, int64_t tag) {
  check_owner(*state_);
  check_tensor(tensor, "cannot receive into");
  check_peer(peer, rank_, size_);
  if (!tensor.is_contiguous()) {
    throw std::invalid_argument("the shared-memory transport receives into contiguous tensors");
  }
  auto op = std::make_shared<RecvOp>();
  op->tensor = tensor;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->posted[{peer, tag}].push_back(op);
    state_->progress();
  }
  return std::make_shared<ShmHandle>(state_, nullptr, op, peer);
}

void ShmTransport::abort(const std::string& why) {
  ShmState& st = *state_;
  check_owner(st);
  for (int r = 0; r < size_; ++r) {
    Inbox* box = r < static_cast<int>(st.inboxes.size()) ? st.inboxes[r] : nullptr;
    if (r == rank_ || box == nullptr) continue;
    int32_t expected = -1;
    if (box->aborted_by.compare_exchange_strong(expected, -2)) {  // first to abort writes why
      const size_t n = std::min(why.size(), sizeof(box->why) - 1);
      std::memcpy(box->why, why.data(), n);
      box->why[n] = '\0';
      box->aborted_by.store(rank_, std::memory_order_release);
    }
    box->posted.fetch_add(1, std::memory_order_release);
    futex_wake(&box->posted);
    // a peer waiting for a free slot in this rank's inbox sleeps on its lane here
    if (st.inboxes[rank_] != nullptr) futex_wake(&st.inboxes[rank_]->lanes[r].freed);
  }
}

}  // namespace ppfast
