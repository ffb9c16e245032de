package ferry

import scala.collection.mutable.ArrayBuffer

/**
 * The JVM-only planning of [[Convolve]]: where the samples of a series are, and which
 * neighbouring samples (halos) each block needs, computed without Python.
 *
 * A *run* is a maximal sequence of rows of one partition whose ids increase by exactly one in
 * arrival order. The planning pass records, per run, its first id, its length and its first and
 * last `K = kernel length - 1` samples; the driver checks that the runs tile 0..N-1 exactly and
 * cuts each run's halos out of its neighbours' recorded samples.
 */
private[ferry] object ConvolvePlan {

  /** One run as seen by the planning pass. */
  final case class RunInfo(
      start: Long,
      length: Long,
      headRe: Array[Double],
      headIm: Array[Double],
      tailRe: Array[Double],
      tailIm: Array[Double]) {
    def end: Long = start + length
  }

  /** One partition's runs in arrival order; `abandoned` when it had more than the allowed number. */
  final case class PartitionPlan(partition: Int, runs: Array[RunInfo], abandoned: Boolean, rows: Long)

  /** What the compute pass needs for one run: its ids, its recorded samples and its halos. */
  final case class RunPlan(
      run: RunInfo,
      leftStart: Long,
      leftRe: Array[Double],
      leftIm: Array[Double],
      rightRe: Array[Double],
      rightIm: Array[Double]) {
    def firstSent: Long = leftStart
    def lastSent: Long = run.end + rightRe.length - 1
  }

  /** The broadcast plan of the compute pass. */
  final case class ComputePlan(n: Long, partitions: Map[Int, Array[RunPlan]])

  /** Column names used in messages. */
  final case class Names(id: String, real: String, imag: String)

  /**
   * Plans one partition's samples. Stops early, returning an abandoned plan, when the partition
   * holds more than `maxRuns` runs.
   */
  def planPartition(partition: Int, chunks: Iterator[SampleChunk], k: Int, maxRuns: Int): PartitionPlan = {
    val runs = ArrayBuffer.empty[RunInfo]
    val headRe = new Array[Double](k)
    val headIm = new Array[Double](k)
    val tailRe = new Array[Double](k)
    val tailIm = new Array[Double](k)
    var start = 0L
    var len = 0L
    var prev = 0L
    var rowIndex = 0L

    def close(): Unit = if (len > 0) {
      val h = math.min(len, k.toLong).toInt
      val tRe = new Array[Double](h)
      val tIm = new Array[Double](h)
      // The tail is a ring buffer: sample i of the run sits at i % k.
      var j = 0
      while (j < h) {
        val pos = ((len - h + j) % k).toInt
        tRe(j) = tailRe(pos)
        tIm(j) = tailIm(pos)
        j += 1
      }
      runs += RunInfo(start, len, java.util.Arrays.copyOf(headRe, h), java.util.Arrays.copyOf(headIm, h), tRe, tIm)
      len = 0
    }

    while (chunks.hasNext) {
      val c = chunks.next()
      var i = 0
      while (i < c.n) {
        val id = c.ids(i)
        if (len == 0 || id != prev + 1) {
          close()
          if (runs.length >= maxRuns) return PartitionPlan(partition, Array.empty, abandoned = true, rowIndex)
          start = id
        }
        // Only a run's first and last k samples are kept: inside a long run, skip to its last k.
        var stretch = 1
        if (len >= k) {
          val limit = c.n - i
          while (stretch < limit && c.ids(i + stretch) == id + stretch) stretch += 1
          val skip = math.max(0, stretch - k)
          if (skip > 0) {
            i += skip
            len += skip
            rowIndex += skip
            stretch -= skip
            prev = c.ids(i - 1)
          }
        }
        var j = 0
        while (j < stretch) {
          if (k > 0) {
            if (len < k) {
              headRe(len.toInt) = c.reAt(i)
              headIm(len.toInt) = c.imAt(i)
            }
            val pos = (len % k).toInt
            tailRe(pos) = c.reAt(i)
            tailIm(pos) = c.imAt(i)
          }
          prev = c.ids(i)
          len += 1
          rowIndex += 1
          i += 1
          j += 1
        }
      }
    }
    close()
    PartitionPlan(partition, runs.toArray, abandoned = false, rowIndex)
  }

  /**
   * Checks that the runs of all partitions tile 0..N-1 exactly and builds each run's halos:
   * left ids [max(0, a - hl), a), right ids [b, min(N, b + hr)) for a run [a, b).
   */
  def computePlan(plans: Seq[PartitionPlan], hlFor: Long => Int, hrFor: Long => Int, names: Names): ComputePlan = {
    val all = plans.flatMap(p => p.runs.indices.map(i => (p.partition, i, p.runs(i)))).sortBy(_._3.start).toArray
    if (all.isEmpty) return ComputePlan(0L, Map.empty)
    val first = all.head._3
    if (first.start != 0) {
      throw new InvalidInputException("convolve", s"Column '${names.id}': ids must start at 0, found smallest id " +
        s"${first.start}. Ids must be the dense range 0..N-1 (one row per sample); subtract the smallest id or " +
        s"renumber with row_number() - 1.")
    }
    var expected = first.end
    var i = 1
    while (i < all.length) {
      val r = all(i)._3
      if (r.start > expected) {
        throw new InvalidInputException("convolve", s"Column '${names.id}': ids must be a dense range 0..N-1: " +
          s"missing ids [$expected, ${r.start}). Every sample needs exactly one row; fill the gap (e.g. with zeros) " +
          "or renumber the ids.")
      }
      if (r.start < expected) {
        throw new InvalidInputException("convolve", s"Column '${names.id}': ids must be a dense range 0..N-1: " +
          s"duplicate ids [${r.start}, ${math.min(expected, r.end)}). Every sample needs exactly one row; " +
          "drop the duplicates (e.g. dropDuplicates on the id column).")
      }
      expected = r.end
      i += 1
    }
    val n = expected
    val hl = hlFor(n)
    val hr = hrFor(n)
    val runs = all.map(_._3)
    val planned = all.indices.map { idx =>
      val (pid, pos, r) = all(idx)
      // Left halo: the tails of the runs before, walking back until hl samples (or id 0) are covered.
      val lo = math.max(0L, r.start - hl)
      val leftN = (r.start - lo).toInt
      val leftRe = new Array[Double](leftN)
      val leftIm = new Array[Double](leftN)
      var j = idx - 1
      var need = r.start // exclusive upper id still to fill
      while (need > lo) {
        val q = runs(j)
        val from = math.max(q.start, lo)
        val count = (need - from).toInt
        val tailFirstId = q.end - q.tailRe.length
        System.arraycopy(q.tailRe, (from - tailFirstId).toInt, leftRe, (from - lo).toInt, count)
        System.arraycopy(q.tailIm, (from - tailFirstId).toInt, leftIm, (from - lo).toInt, count)
        need = from
        j -= 1
      }
      // Right halo: the heads of the runs after, walking forward until hr samples (or id N-1) are covered.
      val hi = math.min(n, r.end + hr)
      val rightN = (hi - r.end).toInt
      val rightRe = new Array[Double](rightN)
      val rightIm = new Array[Double](rightN)
      j = idx + 1
      var have = r.end
      while (have < hi) {
        val q = runs(j)
        val until = math.min(q.end, hi)
        val count = (until - have).toInt
        System.arraycopy(q.headRe, (have - q.start).toInt, rightRe, (have - r.end).toInt, count)
        System.arraycopy(q.headIm, (have - q.start).toInt, rightIm, (have - r.end).toInt, count)
        have = until
        j += 1
      }
      (pid, pos, RunPlan(r, lo, leftRe, leftIm, rightRe, rightIm))
    }
    val byPartition = planned.groupBy(_._1).map { case (pid, xs) => pid -> xs.sortBy(_._2).map(_._3).toArray }
    ComputePlan(n, byPartition)
  }

  /**
   * Splits a partition's runs (in arrival order) into groups that can share one Run stream: a
   * new stream is needed when a run's first sent id directly follows the previous run's last
   * sent id, since the worker would take both for one segment.
   */
  def streamGroups(runs: Array[RunPlan]): Seq[Array[RunPlan]] = {
    val groups = ArrayBuffer.empty[Array[RunPlan]]
    val cur = ArrayBuffer.empty[RunPlan]
    runs.foreach { r =>
      if (cur.nonEmpty && r.firstSent == cur.last.lastSent + 1) {
        groups += cur.toArray
        cur.clear()
      }
      cur += r
    }
    if (cur.nonEmpty) groups += cur.toArray
    groups.toSeq
  }

  /** numpy.convolve geometry, as in convolve-wire.md: (s, output length). */
  def geometry(n: Long, taps: Int, mode: String): (Long, Long) = {
    val m = math.min(n, taps.toLong)
    mode match {
      case "full" => (0L, n + taps - 1)
      case "same" => ((m - 1) / 2, math.max(n, taps.toLong))
      case "valid" => (m - 1, math.max(n, taps.toLong) - m + 1)
      case other => throw new IllegalArgumentException(s"unknown mode $other")
    }
  }

  /** Halo sizes (hl, hr) for a series of n samples. */
  def haloSizes(n: Long, taps: Int, mode: String): (Int, Int) = {
    val (s, _) = geometry(n, taps, mode)
    ((taps - 1 - s).toInt, s.toInt)
  }
}
