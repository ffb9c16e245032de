package ferry

import scala.collection.mutable.ArrayBuffer

/**
 * The JVM-only planning of [[Convolve]]: where the samples of a series are, and which
 * neighbouring samples (halos) each block needs, computed without Python.
 *
 * A *run* is a maximal sequence of rows of one partition whose ids increase by exactly one in
 * arrival order. The planning pass reads the ids alone and records, per run, its first id, its
 * length and the row where it starts; the driver checks that the runs tile 0..N-1 exactly. The
 * same task then reads the first `K = kernel length - 1` samples of every run but the first
 * (the *heads*) from a second scan of its partition, stopping once it has them: for a partition
 * holding one run, one column batch.
 *
 * Why only heads: input id a "owns" output a (python/ferry/stages/convolve.py), so a run
 * [a, b) owning its own outputs would need K - s samples before it (the tail of the run before,
 * which only a read of that whole partition finds) and s after it. Shifting ownership by
 * hl = K - s instead, a run owns outputs [a + hl, b + hl): it sends its first hl samples as halo
 * rows, its other samples as owned rows, then the K samples after it (the heads of the runs
 * that follow): the first hl of those owned, the rest halo. The first run (a = 0) owns from
 * output 0; the last run's last sample owns the outputs past N, as the worker has it. Every
 * output is still owned exactly once.
 */
private[ferry] object ConvolvePlan {

  /** One run as seen by the planning pass: ids [start, start + length) from row `row` of its partition. */
  final case class RunInfo(start: Long, length: Long, row: Long) {
    def end: Long = start + length
  }

  /** One partition's runs in arrival order; `abandoned` when it had more than the allowed number. */
  final case class PartitionPlan(partition: Int, runs: Array[RunInfo], abandoned: Boolean, rows: Long)

  /** The first samples of a run, as the planning job read them. */
  final case class Head(re: Array[Double], im: Array[Double])

  /**
   * What the compute pass sends for one run: its own samples, then `extRe`/`extIm`, the samples
   * of ids [run.end, run.end + ext length) from the runs after it. Rows with ids in
   * [ownFrom, ownUntil) are owned, the others halo. `head` is the run's own head as the planning job
   * read it (empty for the first run), checked again when the run is sent.
   */
  final case class RunPlan(run: RunInfo, ownFrom: Long, ownUntil: Long, head: Head, extRe: Array[Double],
      extIm: Array[Double]) {
    def firstSent: Long = run.start
    def lastSent: Long = run.end + extRe.length - 1
  }

  /**
   * The broadcast plan of the compute pass. `inOrder`: the planning pass saw every id in order;
   * false for runs from Parquet footers ([[ParquetRuns]]), whose rows may come in any order
   * within the run.
   */
  final case class ComputePlan(n: Long, partitions: Map[Int, Array[RunPlan]], inOrder: Boolean = true)

  /** Column names used in messages. */
  final case class Names(id: String, real: String, imag: String)

  /**
   * Plans one partition's ids. Stops early, returning an abandoned plan, when the partition
   * holds more than `maxRuns` runs.
   */
  def planPartition(partition: Int, chunks: Iterator[SampleChunk], maxRuns: Int): PartitionPlan = {
    val runs = ArrayBuffer.empty[RunInfo]
    var start = 0L
    var len = 0L
    var runRow = 0L
    var rowIndex = 0L
    while (chunks.hasNext) {
      val c = chunks.next()
      val ids = c.ids
      var i = 0
      while (i < c.n) {
        val id = ids(i)
        if (len == 0 || id != start + len) {
          if (len > 0) {
            runs += RunInfo(start, len, runRow)
            if (runs.length >= maxRuns) return PartitionPlan(partition, Array.empty, abandoned = true, rowIndex)
          }
          start = id
          len = 0
          runRow = rowIndex
        }
        // The rest of the run within this chunk, in one tight loop.
        var j = i + 1
        var expected = id + 1
        while (j < c.n && ids(j) == expected) { j += 1; expected += 1 }
        len += j - i
        rowIndex += j - i
        i = j
      }
    }
    if (len > 0) runs += RunInfo(start, len, runRow)
    PartitionPlan(partition, runs.toArray, abandoned = false, rowIndex)
  }

  /** The heads a partition must give: (run index, first row, samples) for each run not starting at id 0. */
  def wantedHeads(plan: PartitionPlan, k: Int): Array[(Int, Long, Int)] =
    if (k == 0) Array.empty
    else plan.runs.indices.collect {
      case i if plan.runs(i).start != 0 => (i, plan.runs(i).row, math.min(plan.runs(i).length, k.toLong).toInt)
    }.toArray

  /**
   * One partition's wanted heads (in row order, as [[wantedHeads]] gives them), read from its
   * samples; stops reading after the last. `changed` builds the error for a partition whose rows
   * are not those the planning pass saw.
   */
  def readHeads(partition: Int, chunks: Iterator[SampleChunk], runs: Array[RunInfo], wanted: Array[(Int, Long, Int)],
      changed: String => Exception): Array[(Int, Head)] = {
    val out = ArrayBuffer.empty[(Int, Head)]
    var w = 0
    var row = 0L // the current chunk's first row in the partition
    var re: Array[Double] = null
    var im: Array[Double] = null
    while (w < wanted.length) {
      if (!chunks.hasNext) {
        throw changed(s"partition $partition ended after $row rows, before the samples of id " +
          s"${runs(wanted(w)._1).start + math.max(0L, row - wanted(w)._2)}")
      }
      val c = chunks.next()
      var more = true
      while (more && w < wanted.length && wanted(w)._2 < row + c.n) {
        val (ri, first, count) = wanted(w)
        if (re == null) { re = new Array[Double](count); im = new Array[Double](count) }
        val from = math.max(first, row)
        val until = math.min(first + count, row + c.n)
        var r = from
        while (r < until) {
          val at = (r - row).toInt
          val q = (r - first).toInt
          val id = runs(ri).start + q
          if (c.ids(at) != id) throw changed(s"partition $partition gave id ${c.ids(at)} where the plan had id $id")
          re(q) = c.reAt(at)
          im(q) = c.imAt(at)
          r += 1
        }
        if (until == first + count) {
          out += ri -> Head(re, im)
          re = null
          im = null
          w += 1
        } else more = false
      }
      row += c.n
    }
    out.toArray
  }

  /**
   * [[readHeads]] for runs whose ids may come in any order (runs from Parquet footers): each
   * run's rows are read until its first `count` ids are all found, which in order is its first
   * `count` rows. A row of the run outside its ids means the input changed since the footers
   * were read; an id found twice is a duplicate.
   */
  def readHeadsAnyOrder(partition: Int, chunks: Iterator[SampleChunk], runs: Array[RunInfo],
      wanted: Array[(Int, Long, Int)], changed: String => Exception, idName: String): Array[(Int, Head)] = {
    val out = ArrayBuffer.empty[(Int, Head)]
    var w = 0
    var row = 0L // the current chunk's first row in the partition
    var re: Array[Double] = null
    var im: Array[Double] = null
    var seen: java.util.BitSet = null
    var found = 0
    while (w < wanted.length) {
      if (!chunks.hasNext) {
        throw changed(s"partition $partition ended after $row rows, before the first ids of the run from " +
          s"id ${runs(wanted(w)._1).start}")
      }
      val c = chunks.next()
      var at = 0
      while (at < c.n && w < wanted.length) {
        val (ri, first, count) = wanted(w)
        val run = runs(ri)
        if (row + at < first) at = math.min(first - row, c.n.toLong).toInt
        else {
          if (re == null) {
            re = new Array[Double](count)
            im = new Array[Double](count)
            seen = new java.util.BitSet(count)
            found = 0
          }
          // The run's rows in this chunk; in order its first `count` rows hold its head.
          val until = math.min(first + run.length - row, c.n.toLong).toInt
          found += placeById(c, at, until - at, run, run.start, re, im, seen, idName,
            id => changed(s"partition $partition gave id $id among the rows of ids [${run.start}, ${run.end})"))
          at = until
          if (found == count) {
            out += ri -> Head(re, im)
            re = null
            im = null
            w += 1
          } else if (row + at == first + run.length) {
            throw changed(s"partition $partition's rows of ids [${run.start}, ${run.end}) do not hold id " +
              s"${run.start + seen.nextClearBit(0)}")
          }
        }
      }
      row += c.n
    }
    out.toArray
  }

  /**
   * Places `take` rows of chunk `c` from row `off`, rows of `run`, by id: the samples of ids
   * [base, base + re.length) go to `re`/`im` at id - base, each once; ids in [run.start, base)
   * were placed or sent already, so they are duplicates too; ids past base + re.length are not
   * wanted here. An id outside the run fails with `notInRun`. Returns the samples placed.
   */
  def placeById(c: SampleChunk, off: Int, take: Int, run: RunInfo, base: Long, re: Array[Double],
      im: Array[Double], seen: java.util.BitSet, idName: String, notInRun: Long => Exception): Int = {
    var placed = 0
    var j = 0
    while (j < take) {
      val id = c.ids(off + j)
      if (id < run.start || id >= run.end) throw notInRun(id)
      val q = id - base
      if (q < 0) throw duplicateId(idName, id)
      if (q < re.length) {
        if (seen.get(q.toInt)) throw duplicateId(idName, id)
        seen.set(q.toInt)
        re(q.toInt) = c.reAt(off + j)
        im(q.toInt) = c.imAt(off + j)
        placed += 1
      }
      j += 1
    }
    placed
  }

  def duplicateId(idName: String, id: Long): InvalidInputException =
    new InvalidInputException("convolve", s"Column '$idName': ids must be a dense range 0..N-1: duplicate id " +
      s"$id. Every sample needs exactly one row; drop the duplicates (e.g. dropDuplicates on the id column).")

  /**
   * Checks that the runs of all partitions tile 0..N-1 exactly and builds each run's plan: a run
   * [a, b) sends ids [a, min(N, b + k)) and owns [a + hl, min(N, b + hl)), from 0 for the first run,
   * where hl = `hlFor(N)`.
   * `heads(partition, run index)` is a run's head (for every run not starting at 0).
   */
  def computePlan(plans: Seq[PartitionPlan], heads: Map[(Int, Int), Head], hlFor: Long => Int, k: Int,
      names: Names, inOrder: Boolean = true): ComputePlan = {
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
    val noHead = Head(Array.emptyDoubleArray, Array.emptyDoubleArray)
    def headOf(idx: Int): Head =
      if (all(idx)._3.start == 0 || k == 0) noHead
      else heads.getOrElse((all(idx)._1, all(idx)._2),
        throw new IllegalStateException(s"no head read for the run at id ${all(idx)._3.start}"))
    val planned = all.indices.map { idx =>
      val (pid, pos, r) = all(idx)
      // The samples after the run: the heads of the runs that follow, until k samples (or id N-1).
      val hi = math.min(n, r.end + k)
      val extN = (hi - r.end).toInt
      val extRe = new Array[Double](extN)
      val extIm = new Array[Double](extN)
      var j = idx + 1
      var have = r.end
      while (have < hi) {
        val q = all(j)._3
        val h = headOf(j)
        val until = math.min(q.end, hi)
        val count = (until - have).toInt
        System.arraycopy(h.re, (have - q.start).toInt, extRe, (have - r.end).toInt, count)
        System.arraycopy(h.im, (have - q.start).toInt, extIm, (have - r.end).toInt, count)
        have = until
        j += 1
      }
      val ownFrom = if (r.start == 0) 0L else r.start + hl
      (pid, pos, RunPlan(r, ownFrom, math.min(n, r.end + hl), headOf(idx), extRe, extIm))
    }
    val byPartition = planned.groupBy(_._1).map { case (pid, xs) => pid -> xs.sortBy(_._2).map(_._3).toArray }
    ComputePlan(n, byPartition, inOrder)
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

  /** numpy.convolve geometry, as in python/ferry/stages/convolve.py: (s, output length). */
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
