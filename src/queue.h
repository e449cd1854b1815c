/* queue.h: entry point of queue.c (the rings under Queue, JoinableQueue, SimpleQueue and Pipe). */
#ifndef PP_QUEUE_H
#define PP_QUEUE_H

#include "pp.h"

/* Adds the Ring and RingBlock types to the module. */
int pp_queue_exec(PyObject *module, pp_state *st);

#endif /* PP_QUEUE_H */
