/* spin_lock.h: a spin lock for tables guarded a few instructions at a time, safe
 * across fork().
 *
 * FASTRNN_DEFINE_SPIN_LOCK(name) defines fastrnn_<name>_lock() and
 * fastrnn_<name>_unlock() over a static word. Why a spin lock: it is held for a few
 * loads and stores (a slot's search, an entry's key), far less than a mutex's
 * system call when contended. Why the fork handlers: a fork while another thread
 * holds the lock would leave the child spinning forever on a word no thread of its
 * own will clear, and one taken part-way through a change would show the child a
 * half-made entry (a pack-cache buffer set and its key not yet). So the forking
 * thread takes the lock first (pthread_atfork's prepare, registered at the first
 * use) and both sides give it back. What threads that do not exist in the child
 * held (slots, cache entries) stays taken there: a bounded leak.
 */
#ifndef FASTRNN_SPIN_LOCK_H
#define FASTRNN_SPIN_LOCK_H

#include <pthread.h>

#define FASTRNN_DEFINE_SPIN_LOCK(NAME)                                               \
static int fastrnn_##NAME##_lock_word;                                               \
static void fastrnn_##NAME##_lock_raw(void)                                          \
{                                                                                    \
    while (__atomic_exchange_n(&fastrnn_##NAME##_lock_word, 1, __ATOMIC_ACQUIRE))    \
        while (__atomic_load_n(&fastrnn_##NAME##_lock_word, __ATOMIC_RELAXED)) {}     \
}                                                                                    \
static void fastrnn_##NAME##_unlock(void)                                            \
{                                                                                    \
    __atomic_store_n(&fastrnn_##NAME##_lock_word, 0, __ATOMIC_RELEASE);              \
}                                                                                    \
static pthread_once_t fastrnn_##NAME##_fork_once = PTHREAD_ONCE_INIT;                \
static void fastrnn_##NAME##_watch_forks(void)                                       \
{                                                                                    \
    pthread_atfork(fastrnn_##NAME##_lock_raw, fastrnn_##NAME##_unlock,               \
                   fastrnn_##NAME##_unlock);                                         \
}                                                                                    \
static inline void fastrnn_##NAME##_lock(void)                                       \
{                                                                                    \
    pthread_once(&fastrnn_##NAME##_fork_once, fastrnn_##NAME##_watch_forks);         \
    fastrnn_##NAME##_lock_raw();                                                     \
}

#endif
