// The part of the Metal Shading Language (and of MLX's Metal utils) that
// MLX custom kernels use, in C++20 for g++. Semantics follow Metal where a
// kernel can observe them; speed does not matter.
#pragma once

#include <bit>
#include <cmath>
#include <concepts>
#include <limits>
#include <type_traits>

#include "runtime.h"

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef _Float16 half;

#define METAL_FUNC inline
#define EMU_LOC std::source_location loc = std::source_location::current()

namespace metal {

// ---- bfloat: stored as the top 16 bits of a float, computed in float -------

struct bfloat {
  uint16_t bits;
  bfloat() = default;
  static constexpr uint16_t round(float f) {
    uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // nearest even
  }
  template <class U>
    requires(std::is_arithmetic_v<U> || std::is_same_v<U, _Float16>)
  constexpr bfloat(U v) : bits(round(float(v))) {}
  constexpr operator float() const { return std::bit_cast<float>(uint32_t(bits) << 16); }
  template <class U>
  bfloat& operator+=(U v) { return *this = bfloat(float(*this) + float(v)); }
  template <class U>
  bfloat& operator-=(U v) { return *this = bfloat(float(*this) - float(v)); }
  template <class U>
  bfloat& operator*=(U v) { return *this = bfloat(float(*this) * float(v)); }
  template <class U>
  bfloat& operator/=(U v) { return *this = bfloat(float(*this) / float(v)); }
};

}  // namespace metal

// Helpers live in emu:: so that `using namespace metal` brings no stray names.
namespace emu {
template <class T>
concept scalar = std::is_arithmetic_v<T> || std::is_same_v<T, _Float16> ||
                 std::is_same_v<T, metal::bfloat>;
template <class T>
concept floating = std::is_same_v<T, float> || std::is_same_v<T, _Float16> ||
                   std::is_same_v<T, metal::bfloat>;
template <class A, class B>
concept bf_pair = scalar<A> && scalar<B> &&
                  (std::is_same_v<A, metal::bfloat> || std::is_same_v<B, metal::bfloat>);
// bfloat op bfloat/integer stays bfloat; with float or half it becomes float
// (MLX's bfloat16_t rules).
template <class A, class B>
using bf_result = std::conditional_t<
    (std::is_same_v<A, metal::bfloat> || std::is_integral_v<A>) &&
        (std::is_same_v<B, metal::bfloat> || std::is_integral_v<B>),
    metal::bfloat, float>;
// Usual arithmetic conversions, extended to half and bfloat.
template <class A, class B>
using promote_t = std::conditional_t<
    std::is_same_v<A, B>, A,
    std::conditional_t<
        std::is_same_v<A, float> || std::is_same_v<B, float> || (floating<A> && floating<B>), float,
        std::conditional_t<floating<A>, A,
                           std::conditional_t<floating<B>, B, std::common_type_t<A, B>>>>>;
}  // namespace emu

namespace metal {

#define EMU_BF_ARITH(op)                                                         \
  template <class A, class B>                                                    \
    requires emu::bf_pair<A, B>                                                  \
  constexpr emu::bf_result<A, B> operator op(A a, B b) {                         \
    return emu::bf_result<A, B>(float(a) op float(b));                           \
  }
#define EMU_BF_CMP(op)                                                           \
  template <class A, class B>                                                    \
    requires emu::bf_pair<A, B>                                                  \
  constexpr bool operator op(A a, B b) { return float(a) op float(b); }
EMU_BF_ARITH(+) EMU_BF_ARITH(-) EMU_BF_ARITH(*) EMU_BF_ARITH(/)
EMU_BF_CMP(==) EMU_BF_CMP(!=) EMU_BF_CMP(<) EMU_BF_CMP(>) EMU_BF_CMP(<=) EMU_BF_CMP(>=)
constexpr bfloat operator-(bfloat a) { return bfloat(-float(a)); }
constexpr bfloat operator+(bfloat a) { return a; }

// ---- vectors ----------------------------------------------------------------

template <class T, int N>
struct vec;

template <class T, int N>
struct vec_base;
template <class T>
struct alignas(2 * sizeof(T)) vec_base<T, 2> {
  union {
    T e[2];
    struct { T x, y; };
    struct { T r, g; };
  };
};
template <class T>
struct alignas(4 * sizeof(T)) vec_base<T, 3> {
  union {
    T e[3];
    struct { T x, y, z; };
    struct { T r, g, b; };
    vec<T, 2> xy;
  };
};
template <class T>
struct alignas(4 * sizeof(T)) vec_base<T, 4> {
  union {
    T e[4];
    struct { T x, y, z, w; };
    struct { T r, g, b, a; };
    vec<T, 2> xy;
    vec<T, 3> xyz;
  };
};

template <class A>
constexpr int ncomp = 1;
template <class U, int M>
constexpr int ncomp<vec<U, M>> = M;

template <class T, int N>
struct vec : vec_base<T, N> {
  vec() = default;
  template <emu::scalar U>
  constexpr vec(U s) {  // broadcast
    for (int i = 0; i < N; i++) this->e[i] = T(s);
  }
  template <class... A>
    requires(sizeof...(A) >= 2 && (ncomp<A> + ...) == N)
  constexpr vec(A... parts) {
    int i = 0;
    (put(i, parts), ...);
  }
  template <class U>
  constexpr explicit vec(const vec<U, N>& o) {
    for (int i = 0; i < N; i++) this->e[i] = T(o.e[i]);
  }
  constexpr T& operator[](int i) { return this->e[i]; }
  constexpr const T& operator[](int i) const { return this->e[i]; }

 private:
  template <class U>
  constexpr void put(int& i, const U& s) { this->e[i++] = T(s); }
  template <class U, int M>
  constexpr void put(int& i, const vec<U, M>& v) {
    for (int k = 0; k < M; k++) this->e[i++] = T(v.e[k]);
  }
};

#define EMU_VEC_BINOP(op)                                                        \
  template <class T, int N>                                                      \
  constexpr vec<T, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {      \
    vec<T, N> r;                                                                 \
    for (int i = 0; i < N; i++) r.e[i] = T(a.e[i] op b.e[i]);                    \
    return r;                                                                    \
  }                                                                              \
  template <class T, int N, emu::scalar U>                                            \
  constexpr vec<T, N> operator op(const vec<T, N>& a, U b) {                     \
    return a op vec<T, N>(b);                                                    \
  }                                                                              \
  template <class T, int N, emu::scalar U>                                            \
  constexpr vec<T, N> operator op(U a, const vec<T, N>& b) {                     \
    return vec<T, N>(a) op b;                                                    \
  }                                                                              \
  template <class T, int N, class U>                                             \
  constexpr vec<T, N>& operator op##=(vec<T, N>& a, const U& b) {                \
    return a = a op b;                                                           \
  }
EMU_VEC_BINOP(+) EMU_VEC_BINOP(-) EMU_VEC_BINOP(*) EMU_VEC_BINOP(/) EMU_VEC_BINOP(%)
EMU_VEC_BINOP(&) EMU_VEC_BINOP(|) EMU_VEC_BINOP(^) EMU_VEC_BINOP(<<) EMU_VEC_BINOP(>>)

#define EMU_VEC_CMP(op)                                                          \
  template <class T, int N>                                                      \
  constexpr vec<bool, N> operator op(const vec<T, N>& a, const vec<T, N>& b) {   \
    vec<bool, N> r;                                                              \
    for (int i = 0; i < N; i++) r.e[i] = a.e[i] op b.e[i];                       \
    return r;                                                                    \
  }                                                                              \
  template <class T, int N, emu::scalar U>                                            \
  constexpr vec<bool, N> operator op(const vec<T, N>& a, U b) {                  \
    return a op vec<T, N>(b);                                                    \
  }                                                                              \
  template <class T, int N, emu::scalar U>                                            \
  constexpr vec<bool, N> operator op(U a, const vec<T, N>& b) {                  \
    return vec<T, N>(a) op b;                                                    \
  }
EMU_VEC_CMP(==) EMU_VEC_CMP(!=) EMU_VEC_CMP(<) EMU_VEC_CMP(>) EMU_VEC_CMP(<=) EMU_VEC_CMP(>=)
EMU_VEC_CMP(&&) EMU_VEC_CMP(||)

template <class T, int N>
constexpr vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r.e[i] = T(-a.e[i]);
  return r;
}
template <class T, int N>
constexpr vec<T, N> operator~(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r.e[i] = T(~a.e[i]);
  return r;
}
template <class T, int N>
constexpr vec<bool, N> operator!(const vec<T, N>& a) {
  vec<bool, N> r;
  for (int i = 0; i < N; i++) r.e[i] = !a.e[i];
  return r;
}

// Metal's packed vectors: no padding, no alignment beyond the element's.
template <class T, int N>
struct packed_vec {
  T e[N];
  packed_vec() = default;
  template <class... A>
  constexpr packed_vec(A... a) : e{T(a)...} {}
  constexpr packed_vec(const vec<T, N>& v) { for (int i = 0; i < N; i++) e[i] = v.e[i]; }
  constexpr operator vec<T, N>() const {
    vec<T, N> v;
    for (int i = 0; i < N; i++) v.e[i] = e[i];
    return v;
  }
  constexpr T& operator[](int i) { return e[i]; }
  constexpr const T& operator[](int i) const { return e[i]; }
};

#define EMU_VEC_TYPES(T, name)                                                   \
  typedef vec<T, 2> name##2;                                                     \
  typedef vec<T, 3> name##3;                                                     \
  typedef vec<T, 4> name##4;                                                     \
  typedef packed_vec<T, 2> packed_##name##2;                                     \
  typedef packed_vec<T, 3> packed_##name##3;                                     \
  typedef packed_vec<T, 4> packed_##name##4;
EMU_VEC_TYPES(float, float) EMU_VEC_TYPES(_Float16, half) EMU_VEC_TYPES(bfloat, bfloat)
EMU_VEC_TYPES(int, int) EMU_VEC_TYPES(unsigned, uint) EMU_VEC_TYPES(short, short)
EMU_VEC_TYPES(unsigned short, ushort) EMU_VEC_TYPES(signed char, char)
EMU_VEC_TYPES(unsigned char, uchar) EMU_VEC_TYPES(bool, bool) EMU_VEC_TYPES(long, long)
EMU_VEC_TYPES(unsigned long, ulong)

// ---- numeric limits ---------------------------------------------------------

template <class T>
struct numeric_limits : std::numeric_limits<T> {};
template <class T, uint16_t Max, uint16_t Min, uint16_t Eps, uint16_t Inf, uint16_t Nan>
struct limits16 {
  static constexpr bool is_specialized = true;
  static constexpr T from(uint16_t b) { return std::bit_cast<T>(b); }
  static constexpr T max() { return from(Max); }
  static constexpr T min() { return from(Min); }
  static constexpr T lowest() { return from(Max | 0x8000); }
  static constexpr T epsilon() { return from(Eps); }
  static constexpr T infinity() { return from(Inf); }
  static constexpr T quiet_NaN() { return from(Nan); }
};
template <>
struct numeric_limits<_Float16> : limits16<_Float16, 0x7bff, 0x0400, 0x1400, 0x7c00, 0x7e00> {};
template <>
struct numeric_limits<bfloat> : limits16<bfloat, 0x7f7f, 0x0080, 0x3c00, 0x7f80, 0x7fc0> {};

template <class T, class U>
constexpr T as_type(const U& u) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs equal sizes");
  return std::bit_cast<T>(u);
}

// ---- math -------------------------------------------------------------------
// Scalars compute in float and round to the argument's type; vectors map.

#define EMU_MAP1(name)                                                           \
  template <class T, int N>                                                      \
  vec<T, N> name(const vec<T, N>& x) {                                           \
    vec<T, N> r;                                                                 \
    for (int i = 0; i < N; i++) r.e[i] = name(x.e[i]);                           \
    return r;                                                                    \
  }
#define EMU_UNARY(name, expr)                                                    \
  template <emu::floating T>                                                          \
  T name(T x_) {                                                                 \
    float x = float(x_);                                                         \
    return T(expr);                                                              \
  }                                                                              \
  EMU_MAP1(name)
EMU_UNARY(exp, std::exp(x)) EMU_UNARY(exp2, std::exp2(x)) EMU_UNARY(exp10, std::pow(10.0f, x))
EMU_UNARY(log, std::log(x)) EMU_UNARY(log2, std::log2(x)) EMU_UNARY(log10, std::log10(x))
EMU_UNARY(log1p, std::log1p(x)) EMU_UNARY(expm1, std::expm1(x))
EMU_UNARY(sqrt, std::sqrt(x)) EMU_UNARY(rsqrt, 1.0f / std::sqrt(x)) EMU_UNARY(cbrt, std::cbrt(x))
EMU_UNARY(sin, std::sin(x)) EMU_UNARY(cos, std::cos(x)) EMU_UNARY(tan, std::tan(x))
EMU_UNARY(asin, std::asin(x)) EMU_UNARY(acos, std::acos(x)) EMU_UNARY(atan, std::atan(x))
EMU_UNARY(sinh, std::sinh(x)) EMU_UNARY(cosh, std::cosh(x)) EMU_UNARY(tanh, std::tanh(x))
EMU_UNARY(asinh, std::asinh(x)) EMU_UNARY(acosh, std::acosh(x)) EMU_UNARY(atanh, std::atanh(x))
EMU_UNARY(floor, std::floor(x)) EMU_UNARY(ceil, std::ceil(x)) EMU_UNARY(round, std::round(x))
EMU_UNARY(rint, std::nearbyint(x)) EMU_UNARY(trunc, std::trunc(x)) EMU_UNARY(fabs, std::fabs(x))
EMU_UNARY(fract, std::fmin(x - std::floor(x), 0x1.fffffep-1f)) EMU_UNARY(erf, std::erf(x))
EMU_UNARY(saturate, std::fmin(std::fmax(x, 0.0f), 1.0f))
EMU_UNARY(sign, x > 0 ? 1.0f : x < 0 ? -1.0f : x)
EMU_UNARY(recip, 1.0f / x)

template <emu::scalar T>
T abs(T x) {
  if constexpr (emu::floating<T>) return T(std::fabs(float(x)));
  else if constexpr (std::is_signed_v<T>) return x < 0 ? T(-x) : x;
  else return x;
}
EMU_MAP1(abs)

#define EMU_PRED(name, expr)                                                     \
  template <emu::floating T>                                                          \
  bool name(T x_) {                                                              \
    float x = float(x_);                                                         \
    return expr;                                                                 \
  }                                                                              \
  template <class T, int N>                                                      \
  vec<bool, N> name(const vec<T, N>& x) {                                        \
    vec<bool, N> r;                                                              \
    for (int i = 0; i < N; i++) r.e[i] = name(x.e[i]);                           \
    return r;                                                                    \
  }
EMU_PRED(isnan, std::isnan(x)) EMU_PRED(isinf, std::isinf(x)) EMU_PRED(isfinite, std::isfinite(x))
EMU_PRED(signbit, std::signbit(x)) EMU_PRED(isnormal, std::isnormal(x))

// Binary and ternary functions take mixed scalar types and promote.
#define EMU_BINARY(name, expr)                                                   \
  template <emu::scalar A, emu::scalar B>                                                  \
  emu::promote_t<A, B> name(A a_, B b_) {                                             \
    using R = emu::promote_t<A, B>;                                                   \
    if constexpr (emu::floating<R>) {                                                 \
      float a = float(a_), b = float(b_);                                        \
      return R(expr);                                                            \
    } else {                                                                     \
      R a = R(a_), b = R(b_);                                                    \
      return R(expr);                                                            \
    }                                                                            \
  }                                                                              \
  template <class T, int N, class U>                                             \
  vec<T, N> name(const vec<T, N>& a, const U& b_) {                              \
    vec<T, N> b(b_), r;                                                          \
    for (int i = 0; i < N; i++) r.e[i] = T(name(a.e[i], b.e[i]));                \
    return r;                                                                    \
  }
// max/min/fmax/fmin return the other argument when one is NaN.
EMU_BINARY(max, a != a ? b : b != b ? a : (a > b ? a : b))
EMU_BINARY(min, a != a ? b : b != b ? a : (a < b ? a : b))
EMU_BINARY(fmax, a != a ? b : b != b ? a : (a > b ? a : b))
EMU_BINARY(fmin, a != a ? b : b != b ? a : (a < b ? a : b))
EMU_BINARY(pow, std::pow(a, b)) EMU_BINARY(powr, std::pow(a, b))
EMU_BINARY(fmod, std::fmod(a, b)) EMU_BINARY(atan2, std::atan2(a, b))
EMU_BINARY(copysign, std::copysign(a, b)) EMU_BINARY(step, b < a ? 0 : 1)
EMU_BINARY(fdim, std::fdim(a, b)) EMU_BINARY(divide, a / b)

template <emu::scalar A, emu::scalar B, emu::scalar C>
emu::promote_t<emu::promote_t<A, B>, C> fma(A a, B b, C c) {
  using R = emu::promote_t<emu::promote_t<A, B>, C>;
  return R(std::fma(float(a), float(b), float(c)));
}
template <class T, int N, class B, class C>
vec<T, N> fma(const vec<T, N>& a, const B& b_, const C& c_) {
  vec<T, N> b(b_), c(c_), r;
  for (int i = 0; i < N; i++) r.e[i] = T(fma(a.e[i], b.e[i], c.e[i]));
  return r;
}
template <class T, class L, class H>
T clamp(T x, L lo, H hi) {
  return T(min(max(x, T(lo)), T(hi)));
}
template <class T, class U>
T mix(T a, T b, U t) {
  return a + (b - a) * t;
}
template <class T>
T select(T a, T b, bool c) {
  return c ? b : a;
}
template <class T, int N>
vec<T, N> select(const vec<T, N>& a, const vec<T, N>& b, const vec<bool, N>& c) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r.e[i] = c.e[i] ? b.e[i] : a.e[i];
  return r;
}
template <class T, int N>
T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T s = T(0);
  for (int i = 0; i < N; i++) s += a.e[i] * b.e[i];
  return s;
}
template <class T, int N>
T length(const vec<T, N>& a) { return sqrt(dot(a, a)); }
template <class T, int N>
vec<T, N> normalize(const vec<T, N>& a) { return a * rsqrt(dot(a, a)); }
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }
template <int N>
bool all(const vec<bool, N>& v) {
  for (int i = 0; i < N; i++) if (!v.e[i]) return false;
  return true;
}
template <int N>
bool any(const vec<bool, N>& v) {
  for (int i = 0; i < N; i++) if (v.e[i]) return true;
  return false;
}
template <std::integral T>
T popcount(T x) { return T(std::popcount(std::make_unsigned_t<T>(x))); }
template <std::integral T>
T clz(T x) { return T(std::countl_zero(std::make_unsigned_t<T>(x))); }
template <std::integral T>
T ctz(T x) { return T(std::countr_zero(std::make_unsigned_t<T>(x))); }

namespace fast { using namespace metal; }
namespace precise { using namespace metal; }

// ---- atomics (Metal has relaxed order only; relaxed gives TSan no edges) --

enum memory_order {
  memory_order_relaxed, memory_order_acquire, memory_order_release,
  memory_order_acq_rel, memory_order_seq_cst
};
template <class T>
struct atomic {
  std::atomic<T> v;  // same size and layout as T: outputs are plain T buffers
};
typedef atomic<int> atomic_int;
typedef atomic<unsigned> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
typedef atomic<unsigned long> atomic_ulong;
typedef atomic<long> atomic_long;

}  // namespace metal

namespace emu {
template <class T>
std::atomic<T>& raw(volatile metal::atomic<T>* o) { return const_cast<metal::atomic<T>*>(o)->v; }
constexpr std::memory_order order(metal::memory_order o) {
  constexpr std::memory_order m[] = {std::memory_order_relaxed, std::memory_order_acquire,
                                     std::memory_order_release, std::memory_order_acq_rel,
                                     std::memory_order_seq_cst};
  return m[o];
}
}  // namespace emu

namespace metal {

template <class T, class U>
void atomic_store_explicit(volatile atomic<T>* o, U v, memory_order m) { emu::raw(o).store(T(v), emu::order(m)); }
template <class T>
T atomic_load_explicit(volatile atomic<T>* o, memory_order m) { return emu::raw(o).load(emu::order(m)); }
template <class T, class U>
T atomic_exchange_explicit(volatile atomic<T>* o, U v, memory_order m) {
  return emu::raw(o).exchange(T(v), emu::order(m));
}
template <class T, class U>
bool atomic_compare_exchange_weak_explicit(volatile atomic<T>* o, T* expected, U v, memory_order s,
                                           memory_order f) {
  return emu::raw(o).compare_exchange_weak(*expected, T(v), emu::order(s), emu::order(f == memory_order_release ? memory_order_relaxed : f));
}
template <class T, class U>
bool atomic_compare_exchange_strong_explicit(volatile atomic<T>* o, T* expected, U v, memory_order s,
                                             memory_order f) {
  return emu::raw(o).compare_exchange_strong(*expected, T(v), emu::order(s), emu::order(f == memory_order_release ? memory_order_relaxed : f));
}
#define EMU_ATOMIC_RMW(name, expr)                                               \
  template <class T, class U>                                                    \
  T atomic_fetch_##name##_explicit(volatile atomic<T>* o, U v_, memory_order m) {\
    T v = T(v_), old = emu::raw(o).load(std::memory_order_relaxed);                   \
    while (!emu::raw(o).compare_exchange_weak(old, T(expr), emu::order(m),             \
                                         std::memory_order_relaxed)) {}          \
    return old;                                                                  \
  }
EMU_ATOMIC_RMW(add, old + v) EMU_ATOMIC_RMW(sub, old - v) EMU_ATOMIC_RMW(max, old < v ? v : old)
EMU_ATOMIC_RMW(min, v < old ? v : old) EMU_ATOMIC_RMW(and, old & v) EMU_ATOMIC_RMW(or, old | v)
EMU_ATOMIC_RMW(xor, old ^ v)

// ---- barriers ---------------------------------------------------------------

enum class mem_flags : unsigned {
  mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4,
  mem_threadgroup_imageblock = 8, mem_object_data = 16
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(unsigned(a) | unsigned(b)); }

// Every barrier synchronises all memory: missing mem_device flags go unseen.
inline void threadgroup_barrier(mem_flags, EMU_LOC) { emu::barrier(emu::site("threadgroup_barrier", loc)); }

// ---- simdgroup collectives ----------------------------------------------

}  // namespace metal

namespace emu {
template <class T>
struct Lanes {
  T v[kLanes];
  uint32_t active;
  unsigned lane;
  bool on(unsigned l) const { return l < unsigned(kLanes) && (active >> l & 1); }
  int first() const { return std::countr_zero(active); }
};

template <class T>
Lanes<T> collect(const T& x, const char* what, const std::source_location& loc) {
  static_assert(sizeof(T) <= kSlot, "value too large for a simd collective");
  Lanes<T> r;
  auto slots = gather(&x, sizeof(T), site(what, loc), r.active);
  for (int l = 0; l < kLanes; l++) std::memcpy(&r.v[l], slots[l], sizeof(T));
  r.lane = self->lane;
  return r;
}

}  // namespace emu

namespace metal {

inline void simdgroup_barrier(mem_flags, EMU_LOC) {
  char c = 0;
  emu::collect(c, "simdgroup_barrier", loc);
}

#define EMU_SIMD_REDUCE(name, init, expr)                                        \
  template <class T>                                                             \
  T name(T x, EMU_LOC) {                                                         \
    auto g = emu::collect(x, #name, loc);                                              \
    T acc = g.v[g.first()];                                                      \
    for (int l = g.first() + 1; l < emu::kLanes; l++)                            \
      if (g.on(l)) { T y = g.v[l]; acc = expr; }                                 \
    return acc;                                                                  \
  }
EMU_SIMD_REDUCE(simd_sum, 0, acc + y) EMU_SIMD_REDUCE(simd_product, 1, acc * y)
EMU_SIMD_REDUCE(simd_max, 0, max(acc, y)) EMU_SIMD_REDUCE(simd_min, 0, min(acc, y))
EMU_SIMD_REDUCE(simd_and, 0, acc & y) EMU_SIMD_REDUCE(simd_or, 0, acc | y)
EMU_SIMD_REDUCE(simd_xor, 0, acc ^ y)

#define EMU_SIMD_SCAN(name, inclusive, expr)                                     \
  template <class T>                                                             \
  T name(T x, EMU_LOC) {                                                         \
    auto g = emu::collect(x, #name, loc);                                              \
    T acc = T(expr == 0 ? 0 : 1);                                                \
    for (unsigned l = 0; l < g.lane + inclusive; l++)                            \
      if (g.on(l)) acc = expr == 0 ? T(acc + g.v[l]) : T(acc * g.v[l]);           \
    return acc;                                                                  \
  }
EMU_SIMD_SCAN(simd_prefix_exclusive_sum, 0, 0) EMU_SIMD_SCAN(simd_prefix_inclusive_sum, 1, 0)
EMU_SIMD_SCAN(simd_prefix_exclusive_product, 0, 1) EMU_SIMD_SCAN(simd_prefix_inclusive_product, 1, 1)

// Reading a lane that returned (or is out of range) yields its stale slot:
// undefined in Metal, garbage here.
template <class T>
T simd_shuffle(T x, ushort lane, EMU_LOC) { return emu::collect(x, "simd_shuffle", loc).v[lane % emu::kLanes]; }
template <class T>
T simd_broadcast(T x, ushort lane, EMU_LOC) { return emu::collect(x, "simd_broadcast", loc).v[lane % emu::kLanes]; }
template <class T>
T simd_shuffle_xor(T x, ushort mask, EMU_LOC) {
  auto g = emu::collect(x, "simd_shuffle_xor", loc);
  return g.v[(g.lane ^ mask) % emu::kLanes];
}
template <class T>
T simd_shuffle_down(T x, ushort delta, EMU_LOC) {
  auto g = emu::collect(x, "simd_shuffle_down", loc);
  return g.lane + delta < unsigned(emu::kLanes) ? g.v[g.lane + delta] : x;
}
template <class T>
T simd_shuffle_up(T x, ushort delta, EMU_LOC) {
  auto g = emu::collect(x, "simd_shuffle_up", loc);
  return g.lane >= delta ? g.v[g.lane - delta] : x;
}
template <class T>
T simd_shuffle_rotate_down(T x, ushort delta, EMU_LOC) {
  auto g = emu::collect(x, "simd_shuffle_rotate_down", loc);
  return g.v[(g.lane + delta) % emu::kLanes];
}
template <class T>
T simd_shuffle_rotate_up(T x, ushort delta, EMU_LOC) {
  auto g = emu::collect(x, "simd_shuffle_rotate_up", loc);
  return g.v[(g.lane + emu::kLanes - delta % emu::kLanes) % emu::kLanes];
}
template <class T>
T simd_broadcast_first(T x, EMU_LOC) {
  auto g = emu::collect(x, "simd_broadcast_first", loc);
  return g.v[g.first()];
}
inline bool simd_all(bool x, EMU_LOC) {
  auto g = emu::collect(x, "simd_all", loc);
  for (int l = 0; l < emu::kLanes; l++) if (g.on(l) && !g.v[l]) return false;
  return true;
}
inline bool simd_any(bool x, EMU_LOC) {
  auto g = emu::collect(x, "simd_any", loc);
  for (int l = 0; l < emu::kLanes; l++) if (g.on(l) && g.v[l]) return true;
  return false;
}
struct simd_vote {
  uint64_t v;
  explicit operator uint64_t() const { return v; }
  bool all() const { return false; }
  bool any() const { return v != 0; }
};
inline simd_vote simd_ballot(bool x, EMU_LOC) {
  auto g = emu::collect(x, "simd_ballot", loc);
  uint64_t m = 0;
  for (int l = 0; l < emu::kLanes; l++) if (g.on(l) && g.v[l]) m |= uint64_t(1) << l;
  return {m};
}
inline simd_vote simd_active_threads_mask(EMU_LOC) { return simd_ballot(true, loc); }
inline bool simd_is_first(EMU_LOC) {
  auto g = emu::collect(true, "simd_is_first", loc);
  return int(g.lane) == g.first();
}

// Quad operations act on lanes 4q..4q+3 (all simdgroup lanes must take part).
template <class T>
T quad_shuffle(T x, ushort l, EMU_LOC) {
  auto g = emu::collect(x, "quad_shuffle", loc);
  return g.v[(g.lane & ~3u) | (l & 3u)];
}
template <class T>
T quad_broadcast(T x, ushort l, EMU_LOC) { return quad_shuffle(x, l, loc); }
template <class T>
T quad_shuffle_xor(T x, ushort m, EMU_LOC) {
  auto g = emu::collect(x, "quad_shuffle_xor", loc);
  return g.v[(g.lane & ~3u) | ((g.lane ^ m) & 3u)];
}
template <class T>
T quad_shuffle_down(T x, ushort d, EMU_LOC) {
  auto g = emu::collect(x, "quad_shuffle_down", loc);
  return (g.lane & 3u) + d < 4 ? g.v[g.lane + d] : x;
}
template <class T>
T quad_shuffle_up(T x, ushort d, EMU_LOC) {
  auto g = emu::collect(x, "quad_shuffle_up", loc);
  return (g.lane & 3u) >= d ? g.v[g.lane - d] : x;
}
#define EMU_QUAD_REDUCE(name, expr)                                              \
  template <class T>                                                             \
  T name(T x, EMU_LOC) {                                                         \
    auto g = emu::collect(x, #name, loc);                                              \
    unsigned q = g.lane & ~3u;                                                   \
    T acc = g.v[q];                                                              \
    for (unsigned l = q + 1; l < q + 4; l++) { T y = g.v[l]; acc = expr; }        \
    return acc;                                                                  \
  }
EMU_QUAD_REDUCE(quad_sum, acc + y) EMU_QUAD_REDUCE(quad_max, max(acc, y))
EMU_QUAD_REDUCE(quad_min, min(acc, y)) EMU_QUAD_REDUCE(quad_product, acc * y)

// ---- simdgroup matrices -----------------------------------------------------
// Every lane keeps the whole 8x8 matrix; the 2 elements a lane owns on the GPU
// (thread_elements) are authoritative. Loads fill all 64 elements, stores
// write only the lane's own 2, and a multiply rebuilds its operands from all
// lanes' elements, so lanes that edit thread_elements() stay correct.

template <class T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "only 8x8 simdgroup matrices are emulated");
  alignas(16) T m[8][8];
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T diag) {
    for (int i = 0; i < 8; i++) for (int j = 0; j < 8; j++) m[i][j] = i == j ? diag : T(0);
  }
  // The lane's elements as in MLX's steel kernels: (fm, fn) and (fm, fn + 1).
  static void owned(unsigned lane, int& fm, int& fn) {
    unsigned qid = lane / 4;
    fm = int((qid & 4) + ((lane / 2) % 4));
    fn = int((qid & 2) * 2 + (lane % 2) * 2);
  }
  vec<T, 2>& thread_elements() {
    int fm, fn;
    owned(emu::self->lane, fm, fn);
    return *reinterpret_cast<vec<T, 2>*>(&m[fm][fn]);
  }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<_Float16, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int C, int R>
simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, C, R> r;
  for (auto& row : r.m) for (auto& e : row) e = v;
  return r;
}

template <class T, int C, int R, class U>
void simdgroup_load(simdgroup_matrix<T, C, R>& d, const U* src, ulong elements_per_row = C,
                    ulong2 origin = ulong2(0), bool transpose = false) {
  for (int i = 0; i < 8; i++)
    for (int j = 0; j < 8; j++) {
      int r = transpose ? j : i, c = transpose ? i : j;
      d.m[i][j] = T(src[(origin.y + r) * elements_per_row + origin.x + c]);
    }
}

template <class T, int C, int R, class U>
void simdgroup_store(const simdgroup_matrix<T, C, R>& a, U* dst, ulong elements_per_row = C,
                     ulong2 origin = ulong2(0), bool transpose = false) {
  int fm, fn;
  a.owned(emu::self->lane, fm, fn);
  for (int j = fn; j < fn + 2; j++) {
    int r = transpose ? j : fm, c = transpose ? fm : j;
    dst[(origin.y + r) * elements_per_row + origin.x + c] = U(a.m[fm][j]);
  }
}

template <class TD, class TA, class TB, class TC>
void simdgroup_multiply_accumulate(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                   const simdgroup_matrix<TB, 8, 8>& b,
                                   const simdgroup_matrix<TC, 8, 8>& c, EMU_LOC) {
  struct Own { TA a[2]; TB b[2]; TC c[2]; } own;
  int fm, fn;
  a.owned(emu::self->lane, fm, fn);
  for (int k = 0; k < 2; k++) own.a[k] = a.m[fm][fn + k], own.b[k] = b.m[fm][fn + k], own.c[k] = c.m[fm][fn + k];
  auto g = emu::collect(own, "simdgroup_multiply_accumulate", loc);
  float A[8][8], B[8][8], Cm[8][8];
  for (unsigned l = 0; l < unsigned(emu::kLanes); l++) {
    a.owned(l, fm, fn);
    for (int k = 0; k < 2; k++)
      A[fm][fn + k] = float(g.v[l].a[k]), B[fm][fn + k] = float(g.v[l].b[k]), Cm[fm][fn + k] = float(g.v[l].c[k]);
  }
  for (int i = 0; i < 8; i++)
    for (int j = 0; j < 8; j++) {
      float s = Cm[i][j];
      for (int k = 0; k < 8; k++) s = std::fma(A[i][k], B[k][j], s);
      d.m[i][j] = TD(s);
    }
}
template <class TD, class TA, class TB>
void simdgroup_multiply(simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                        const simdgroup_matrix<TB, 8, 8>& b, EMU_LOC) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<TD, 8, 8>(TD(0)), loc);
}

}  // namespace metal

using namespace metal;
typedef half float16_t;
typedef metal::bfloat bfloat16_t;

// ---- MLX's Metal utils (prepended to every custom kernel by MLX) ----------

template <class U>
struct Limits {
  static constexpr U max = metal::numeric_limits<U>::max();
  static constexpr U min = metal::numeric_limits<U>::lowest();
  static constexpr U finite_max = metal::numeric_limits<U>::max();
  static constexpr U finite_min = metal::numeric_limits<U>::lowest();
};
#define EMU_FLOAT_LIMITS(T)                                                      \
  template <>                                                                    \
  struct Limits<T> {                                                             \
    static constexpr T max = metal::numeric_limits<T>::infinity();               \
    static constexpr T min = -metal::numeric_limits<T>::infinity();              \
    static constexpr T finite_max = metal::numeric_limits<T>::max();             \
    static constexpr T finite_min = metal::numeric_limits<T>::lowest();          \
  };
EMU_FLOAT_LIMITS(float) EMU_FLOAT_LIMITS(half) EMU_FLOAT_LIMITS(bfloat16_t)

template <class I, class S>
inline int64_t elem_to_loc(I elem, const int* shape, const S* strides, int ndim) {
  int64_t loc = 0, e = int64_t(elem);
  for (int i = ndim - 1; i >= 0 && e > 0; --i) {
    loc += (e % shape[i]) * int64_t(strides[i]);
    e /= shape[i];
  }
  return loc;
}
inline size_t ceildiv(size_t n, size_t m) { return (n + m - 1) / m; }

namespace emu {
// `threadgroup T name[N];` in a kernel becomes `auto& name = tg_var<T[N]>(id);`
template <class T>
T& tg_var(int id) {
  return *static_cast<T*>(self->g->tgvar(id, sizeof(T), alignof(T)));
}
}  // namespace emu

// Metal address spaces carry no meaning here; defined last so the runtime
// above can still say std::thread.
#define device
#define constant
#define thread
#define threadgroup
