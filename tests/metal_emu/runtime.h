// Runs the threadgroups of one Metal kernel dispatch on OS threads.
//
// One OS thread per Metal thread, so ThreadSanitizer sees every Metal thread
// and barriers are real. A "team" of threads runs one threadgroup at a time;
// two teams run groups concurrently so races between groups can show up too.
// All synchronisation goes through one mutex per group: TSan understands it,
// and it lets us notice deadlocks (every live thread waiting) and barriers or
// simd collectives reached from different source lines.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <random>
#include <source_location>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__)
extern "C" {
void __tsan_acquire(void*);
void __tsan_release(void*);
void AnnotateIgnoreSyncBegin(const char*, int);
void AnnotateIgnoreSyncEnd(const char*, int);
void __tsan_ignore_thread_begin();
void __tsan_ignore_thread_end();
}
#endif

namespace emu {

// The emulator's own bookkeeping shares one mutex per group. TSan must not
// see it: its lock order would link every thread of the group and hide
// races. Bookkeeping runs Quiet, and each barrier or collective adds
// happens-before edges among its own participants only, as Metal does.
#if defined(__SANITIZE_THREAD__)
struct Quiet {
  Quiet() { __tsan_ignore_thread_begin(); AnnotateIgnoreSyncBegin(__FILE__, __LINE__); }
  ~Quiet() { AnnotateIgnoreSyncEnd(__FILE__, __LINE__); __tsan_ignore_thread_end(); }
};
inline void hb_release(void* p) { __tsan_release(p); }
inline void hb_acquire(void* p) { __tsan_acquire(p); }
#else
struct Quiet {};
inline void hb_release(void*) {}
inline void hb_acquire(void*) {}
#endif

[[noreturn]] inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fputs("metal_emu error: ", stderr);
  std::vfprintf(stderr, fmt, ap);
  std::fputs("\n", stderr);
  va_end(ap);
  std::fflush(stderr);
  std::_Exit(70);
}

// Where a barrier or collective was called (the kernel's #line mapping).
struct Site {
  const char* file = "";
  unsigned line = 0, col = 0;
  const char* what = "";
  bool operator==(const Site& o) const {
    return line == o.line && col == o.col && std::strcmp(file, o.file) == 0 &&
           std::strcmp(what, o.what) == 0;
  }
  std::string str() const {
    return std::string(what) + " at " + file + ":" + std::to_string(line) + ":" +
           std::to_string(col);
  }
};

inline Site site(const char* what, const std::source_location& l) {
  return {l.file_name(), unsigned(l.line()), unsigned(l.column()), what};
}

struct Sync {
  std::condition_variable cv;
  int expected = 0, arrived = 0;
  unsigned gen = 0;
  Site at;
  uint32_t live = 0;             // simdgroups: lanes that have not returned
  uint32_t* active = nullptr;    // where completion records who took part
};

constexpr int kLanes = 32;
constexpr int kSlot = 128;  // bytes a lane may contribute to one collective
constexpr size_t kThreadgroupMemory = 32768;

struct SimdSlots {
  // Double-buffered so one sync per collective suffices: a lane can only
  // write buffer k+2 after every lane has arrived at k+1, i.e. finished k.
  alignas(64) unsigned char b[2][kLanes][kSlot];
  uint32_t active[2];
};

// Metal attribute values of one thread; the generated launcher reads them.
struct Attrs {
  unsigned thread_position_in_grid[3], threadgroup_position_in_grid[3],
      thread_position_in_threadgroup[3], threads_per_threadgroup[3],
      dispatch_threads_per_threadgroup[3], threadgroups_per_grid[3],
      threads_per_grid[3], grid_size[3], grid_origin[3];
  unsigned thread_index_in_threadgroup[3], thread_index_in_simdgroup[3],
      simdgroup_index_in_threadgroup[3], simdgroups_per_threadgroup[3],
      dispatch_simdgroups_per_threadgroup[3], threads_per_simdgroup[3],
      thread_execution_width[3], thread_index_in_quadgroup[3],
      quadgroup_index_in_threadgroup[3], quadgroups_per_threadgroup[3],
      dispatch_quadgroups_per_threadgroup[3];
};

struct Group;

struct Thread {
  Group* g;
  unsigned lane, sg;
  uint64_t ncoll = 0;  // collectives done: picks the slot buffer
  std::minstd_rand rng;
  Attrs a;
};

inline thread_local Thread* self = nullptr;

struct Config {
  unsigned grid[3], tg[3], groups[3];
  long ngroups;
  int teams;
  bool stress;
  uint64_t seed;
};

inline Config cfg;
inline std::vector<void*> buffers;

inline void jitter(Thread& t) {
  if (!cfg.stress) return;
  unsigned r = t.rng() % 8;
  if (r < 3) std::this_thread::sleep_for(std::chrono::microseconds(t.rng() % 200));
  else if (r < 6) std::this_thread::yield();
}

struct Group {
  std::mutex m;
  long id = 0;
  int nthreads = 0, live = 0, blocked = 0;
  unsigned pos[3], dims[3];
  Sync tg;
  std::vector<Sync> simd;
  std::vector<SimdSlots> slots;
  std::vector<void*> tgmem;
  size_t tgbytes = 0;
  std::mt19937_64 rng;

  void reset(long gid) {
    id = gid;
    pos[0] = gid % cfg.groups[0];
    pos[1] = (gid / cfg.groups[0]) % cfg.groups[1];
    pos[2] = gid / (long(cfg.groups[0]) * cfg.groups[1]);
    nthreads = 1;
    for (int d = 0; d < 3; d++) {
      // dispatchThreads: the edge group only holds threads inside the grid.
      dims[d] = std::min(cfg.tg[d], cfg.grid[d] - pos[d] * cfg.tg[d]);
      nthreads *= dims[d];
    }
    live = nthreads;
    blocked = 0;
    tg.expected = nthreads;
    tg.arrived = 0;
    int nsg = (nthreads + kLanes - 1) / kLanes;
    simd = std::vector<Sync>(nsg);
    slots.resize(nsg);
    for (int s = 0; s < nsg; s++) {
      simd[s].expected = std::min(kLanes, nthreads - s * kLanes);
      simd[s].live = uint32_t((uint64_t(1) << simd[s].expected) - 1);
    }
    rng.seed(cfg.seed * 0x9E3779B97F4A7C15ull + gid);
    garbage(slots.data(), slots.size() * sizeof(SimdSlots));
  }

  void release_tgmem() {
    for (void* p : tgmem) std::free(p);
    tgmem.clear();
    tgbytes = 0;
  }

  void garbage(void* p, size_t n) {
    auto* c = static_cast<unsigned char*>(p);
    for (size_t i = 0; i < n; i++) c[i] = static_cast<unsigned char>(rng());
  }

  // Threadgroup variable `id`: allocated and filled with garbage by whichever
  // thread of the group declares it first.
  void* tgvar(int vid, size_t bytes, size_t align) {
    Quiet q;
    std::lock_guard<std::mutex> lk(m);
    if (tgmem.size() <= size_t(vid)) tgmem.resize(vid + 1, nullptr);
    if (!tgmem[vid]) {
      void* p = nullptr;
      if (posix_memalign(&p, std::max<size_t>(align, 16), bytes)) fail("out of memory");
      garbage(p, bytes);
      tgbytes += bytes;
      if (tgbytes > kThreadgroupMemory)
        fail("threadgroup memory of %zu bytes exceeds Metal's %zu", tgbytes, kThreadgroupMemory);
      tgmem[vid] = p;
    }
    return tgmem[vid];
  }

  std::string waiting() {
    std::string s;
    if (tg.arrived) s += "\n  " + std::to_string(tg.arrived) + " threads wait in " + tg.at.str();
    for (size_t i = 0; i < simd.size(); i++)
      if (simd[i].arrived)
        s += "\n  simdgroup " + std::to_string(i) + ": " + std::to_string(simd[i].arrived) +
             " lanes wait in " + simd[i].at.str();
    return s;
  }

  void complete(Sync& s, int waiters) {
    if (s.active) *s.active = s.live;
    s.arrived = 0;
    s.gen++;
    blocked -= waiters;
    s.cv.notify_all();
  }

  void check_deadlock() {
    if (blocked > 0 && blocked == live)
      fail("deadlock in threadgroup %ld: every live thread waits and none can proceed "
           "(a barrier or simd collective skipped by some threads?)%s",
           id, waiting().c_str());
  }

  void arrive(Sync& s, const Site& at, bool whole_group, uint32_t* active = nullptr) {
    hb_release(&s);
    wait(s, at, whole_group, active);
    hb_acquire(&s);
  }

  void wait(Sync& s, const Site& at, bool whole_group, uint32_t* active) {
    Quiet q;
    std::unique_lock<std::mutex> lk(m);
    if (whole_group && live != nthreads)
      fail("%s reached in threadgroup %ld after %d of its threads returned; Metal "
           "requires every thread of the group to reach each barrier",
           at.str().c_str(), id, nthreads - live);
    if (s.arrived == 0) {
      s.at = at;
      s.active = active;
    } else if (!(s.at == at))
      fail("divergent %s in threadgroup %ld: some threads wait in %s, this one reached %s",
           whole_group ? "barrier" : "simd collective", id, s.at.str().c_str(), at.str().c_str());
    if (++s.arrived == s.expected) {
      complete(s, s.expected - 1);
      return;
    }
    blocked++;
    check_deadlock();
    unsigned gen = s.gen;
    s.cv.wait(lk, [&] { return s.gen != gen; });
  }

  // A thread returned from the kernel: its simdgroup's collectives carry on
  // with the remaining (active) lanes, as on the GPU.
  void leave(Thread& t) {
    Quiet q;
    std::lock_guard<std::mutex> lk(m);
    live--;
    if (tg.arrived)
      fail("a thread of threadgroup %ld returned while others wait in %s", id, tg.at.str().c_str());
    Sync& s = simd[t.sg];
    s.expected--;
    s.live &= ~(uint32_t(1) << t.lane);
    if (s.arrived && s.arrived == s.expected) complete(s, s.arrived);
    check_deadlock();
  }
};

inline void barrier(const Site& at) {
  Thread& t = *self;
  jitter(t);
  t.g->arrive(t.g->tg, at, true);
}

// Every live lane of the simdgroup contributes `bytes`; returns the
// lane-indexed slots and sets `active` to the lanes that took part (lanes
// that returned leave stale bytes, so a shuffle reading one gets garbage).
inline const unsigned char (*gather(const void* v, size_t bytes, const Site& at, uint32_t& active))[kSlot] {
  Thread& t = *self;
  Group& g = *t.g;
  SimdSlots& sl = g.slots[t.sg];
  int k = t.ncoll++ & 1;
  std::memcpy(sl.b[k][t.lane], v, bytes);
  jitter(t);
  g.arrive(g.simd[t.sg], at, false, &sl.active[k]);
  Quiet q;
  active = sl.active[k];
  return sl.b[k];
}

// ---- process entry ---------------------------------------------------------

struct Team {
  std::mutex m;
  std::condition_variable cv;
  int arrived = 0;
  unsigned gen = 0;
  int size = 0;
  Group g;
  long gid = 0;

  void sync() {
    std::unique_lock<std::mutex> lk(m);
    if (++arrived == size) {
      arrived = 0;
      gen++;
      cv.notify_all();
      return;
    }
    unsigned my = gen;
    cv.wait(lk, [&] { return gen != my; });
  }
};

inline std::atomic<long> next_group{0};

inline void set_attrs(Thread& t, Group& g, int idx) {
  Attrs& a = t.a;
  std::memset(&a, 0, sizeof a);
  unsigned local[3] = {idx % g.dims[0], (idx / g.dims[0]) % g.dims[1],
                       idx / (g.dims[0] * g.dims[1])};
  unsigned dispatch = cfg.tg[0] * cfg.tg[1] * cfg.tg[2];
  for (int d = 0; d < 3; d++) {
    a.thread_position_in_threadgroup[d] = local[d];
    a.threadgroup_position_in_grid[d] = g.pos[d];
    a.thread_position_in_grid[d] = g.pos[d] * cfg.tg[d] + local[d];
    a.threads_per_threadgroup[d] = g.dims[d];
    a.dispatch_threads_per_threadgroup[d] = cfg.tg[d];
    a.threadgroups_per_grid[d] = cfg.groups[d];
    a.threads_per_grid[d] = a.grid_size[d] = cfg.grid[d];
  }
  a.thread_index_in_threadgroup[0] = idx;
  a.thread_index_in_simdgroup[0] = t.lane = idx % kLanes;
  a.simdgroup_index_in_threadgroup[0] = t.sg = idx / kLanes;
  a.simdgroups_per_threadgroup[0] = (g.nthreads + kLanes - 1) / kLanes;
  a.dispatch_simdgroups_per_threadgroup[0] = (dispatch + kLanes - 1) / kLanes;
  a.threads_per_simdgroup[0] = a.thread_execution_width[0] = kLanes;
  a.thread_index_in_quadgroup[0] = idx % 4;
  a.quadgroup_index_in_threadgroup[0] = idx / 4;
  a.quadgroups_per_threadgroup[0] = (g.nthreads + 3) / 4;
  a.dispatch_quadgroups_per_threadgroup[0] = (dispatch + 3) / 4;
}

inline void team_main(Team& team, int idx, void (*kernel)()) {
  Thread t;
  t.g = &team.g;
  for (;;) {
    if (idx == 0) {
      // Relaxed: claiming a group must not order the teams' work (TSan).
      team.gid = next_group.fetch_add(1, std::memory_order_relaxed);
      if (team.gid < cfg.ngroups) team.g.reset(team.gid);
    }
    team.sync();
    if (team.gid >= cfg.ngroups) return;
    if (idx < team.g.nthreads) {
      t.rng.seed(uint32_t(cfg.seed * 7919 + team.gid * 1031 + idx + 1));
      t.ncoll = 0;
      set_attrs(t, team.g, idx);
      self = &t;
      jitter(t);
      kernel();
      self = nullptr;
      team.g.leave(t);
    }
    team.sync();
    if (idx == 0) team.g.release_tgmem();
  }
}

// argv[1]: a job folder with job.txt and in<i>.bin; writes out<i>.bin.
inline int main(int argc, char** argv, void (*kernel)()) {
  if (argc != 2) fail("usage: %s JOB_DIR", argv[0]);
  std::string dir = argv[1];
  std::ifstream job(dir + "/job.txt");
  std::string key;
  int nbuf = 0;
  job >> key >> cfg.grid[0] >> cfg.grid[1] >> cfg.grid[2];
  job >> key >> cfg.tg[0] >> cfg.tg[1] >> cfg.tg[2];
  job >> key >> cfg.teams >> key >> cfg.stress >> key >> cfg.seed >> key >> nbuf;
  if (!job) fail("bad job file %s/job.txt", dir.c_str());
  std::vector<void*> bases(nbuf);
  std::vector<size_t> sizes(nbuf);
  std::vector<int> is_out(nbuf);
  buffers.resize(nbuf);
  for (int i = 0; i < nbuf; i++) {
    size_t offset;
    job >> sizes[i] >> offset >> is_out[i];
    // Exact-size heap blocks: AddressSanitizer flags a read one past the end.
    if (posix_memalign(&bases[i], 64, std::max<size_t>(sizes[i], 1))) fail("out of memory");
    std::ifstream f(dir + "/in" + std::to_string(i) + ".bin", std::ios::binary);
    f.read(static_cast<char*>(bases[i]), sizes[i]);
    if (!f) fail("cannot read buffer %d", i);
    buffers[i] = static_cast<char*>(bases[i]) + offset;
  }
  cfg.ngroups = 1;
  for (int d = 0; d < 3; d++) {
    cfg.tg[d] = std::min(cfg.tg[d], cfg.grid[d]);  // as MLX clamps the group
    cfg.groups[d] = (cfg.grid[d] + cfg.tg[d] - 1) / cfg.tg[d];
    cfg.ngroups *= cfg.groups[d];
  }
  int size = cfg.tg[0] * cfg.tg[1] * cfg.tg[2];
  int teams = int(std::max(1L, std::min<long>(cfg.teams, cfg.ngroups)));
  std::vector<Team> team(teams);
  std::vector<std::thread> threads;
  for (auto& tm : team) {
    tm.size = size;
    for (int i = 0; i < size; i++) threads.emplace_back(team_main, std::ref(tm), i, kernel);
  }
  for (auto& th : threads) th.join();
  for (int i = 0; i < nbuf; i++) {
    if (!is_out[i]) continue;
    std::ofstream f(dir + "/out" + std::to_string(i) + ".bin", std::ios::binary);
    f.write(static_cast<char*>(bases[i]), sizes[i]);
  }
  return 0;
}

}  // namespace emu
