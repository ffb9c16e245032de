package ferry

import org.apache.spark.rdd.RDD
import org.apache.spark.sql.DataFrame
import org.apache.spark.sql.catalyst.InternalRow
import org.apache.spark.sql.catalyst.expressions.AttributeReference
import org.apache.spark.sql.execution.{ColumnarToRowExec, InputAdapter, ProjectExec, SparkPlan, WholeStageCodegenExec}
import org.apache.spark.sql.types.{DataType, DoubleType, LongType}
import org.apache.spark.sql.vectorized.{ColumnVector, ColumnarBatch}

import ferry.ConvolvePlan.Names

/**
 * A series' samples as they arrive in one partition, in column chunks: `n` ids and their real and
 * imaginary parts. Both of Convolve's passes walk a partition this way, whether Spark hands it
 * over as rows or, for a columnar scan such as Parquet, as column batches copied in bulk (which
 * skips a row conversion per sample in each pass).
 */
private[ferry] final class SampleChunk(val n: Int, val ids: Array[Long], val re: Array[Double], val im: Array[Double],
    reVector: ColumnVector = null, imVector: ColumnVector = null) {
  // A chunk read for planning keeps its values in the scan's vectors (valid until the next
  // batch): the plan reads only a few samples per run, so they are not copied out.
  def reAt(i: Int): Double = if (re ne null) re(i) else reVector.getDouble(i)
  def imAt(i: Int): Double = if (im ne null) im(i) else imVector.getDouble(i)
}

private[ferry] object SampleChunks {

  /** Rows per chunk on the row path: large enough to amortize the calls, small enough for L1/L2. */
  val RowChunk = 4096

  private def nullId(names: Names, partition: Int, row: Long) =
    new InvalidInputException("convolve", s"Column '${names.id}' is null at row $row of partition $partition; " +
      "every sample needs an id in 0..N-1. Drop or fill the rows with null ids first.")

  def nullValue(col: String, id: Long): InvalidInputException =
    new InvalidInputException("convolve", s"Column '$col' is null at id $id; Convolve needs a value for every " +
      "sample. Fill the nulls (e.g. na.fill(0.0)) or drop those rows and renumber the ids.")

  /**
   * Chunks of (id bigint, real double, imag double) rows; nulls fail naming the row or id. Without
   * `copyValues` the chunks hold the ids alone (the values are still checked for nulls).
   */
  def fromRows(rows: Iterator[InternalRow], names: Names, pid: Int, copyValues: Boolean = true): Iterator[SampleChunk] =
    new Iterator[SampleChunk] {
      private var seen = 0L
      def hasNext: Boolean = rows.hasNext
      def next(): SampleChunk = {
        val ids = new Array[Long](RowChunk)
        val re = if (copyValues) new Array[Double](RowChunk) else null
        val im = if (copyValues) new Array[Double](RowChunk) else null
        var n = 0
        while (n < RowChunk && rows.hasNext) {
          val row = rows.next()
          if (row.isNullAt(0)) throw nullId(names, pid, seen + n)
          val id = row.getLong(0)
          if (row.isNullAt(1)) throw nullValue(names.real, id)
          if (row.isNullAt(2)) throw nullValue(names.imag, id)
          ids(n) = id
          if (copyValues) {
            re(n) = row.getDouble(1)
            im(n) = row.getDouble(2)
          }
          n += 1
        }
        seen += n
        new SampleChunk(n, ids, re, im)
      }
    }

  /** Chunks copied out of column batches whose columns `ordinals` are (id bigint, real double, imag double). */
  def fromBatches(batches: Iterator[ColumnarBatch], ordinals: Array[Int], names: Names,
      pid: Int, copyValues: Boolean = true): Iterator[SampleChunk] = new Iterator[SampleChunk] {
    private var seen = 0L
    def hasNext: Boolean = batches.hasNext
    def next(): SampleChunk = {
      // The scan reuses its batch for the next one: everything is copied out before returning.
      val b = batches.next()
      val n = b.numRows()
      val idv = b.column(ordinals(0))
      val rev = b.column(ordinals(1))
      val imv = b.column(ordinals(2))
      if (idv.hasNull) throw nullId(names, pid, seen + firstNull(idv, n))
      val ids = idv.getLongs(0, n)
      if (rev.hasNull) throw nullValue(names.real, ids(firstNull(rev, n)))
      if (imv.hasNull) throw nullValue(names.imag, ids(firstNull(imv, n)))
      seen += n
      if (copyValues) new SampleChunk(n, ids, rev.getDoubles(0, n), imv.getDoubles(0, n))
      else new SampleChunk(n, ids, null, null, rev, imv)
    }
  }

  /** Chunks of the ids alone from column batches whose column `ordinal` is the id (bigint). */
  def idsFromBatches(batches: Iterator[ColumnarBatch], ordinal: Int, names: Names, pid: Int): Iterator[SampleChunk] =
    new Iterator[SampleChunk] {
      private var seen = 0L
      def hasNext: Boolean = batches.hasNext
      def next(): SampleChunk = {
        val b = batches.next()
        val n = b.numRows()
        val idv = b.column(ordinal)
        if (idv.hasNull) throw nullId(names, pid, seen + firstNull(idv, n))
        seen += n
        new SampleChunk(n, idv.getLongs(0, n), null, null)
      }
    }

  private def firstNull(v: ColumnVector, n: Int): Int = {
    var i = 0
    while (i < n && !v.isNullAt(i)) i += 1
    i
  }

  /**
   * The column batches behind `df` when its physical plan is a columnar scan turned into rows
   * (optionally with a pure column selection on top), with the ordinals of `df`'s columns in
   * them; None for any other plan (filters, joins, casts, row-based sources), which takes the
   * row path. `df` must have exactly the columns `types` (by default id bigint, real double, imag double).
   */
  def columnarSource(df: DataFrame, types: Seq[DataType] = Seq(LongType, DoubleType, DoubleType))
      : Option[(RDD[ColumnarBatch], Array[Int])] = {
    if (df.schema.map(_.dataType) != types) return None
    def unwrap(p: SparkPlan): SparkPlan = p match {
      case w: WholeStageCodegenExec => unwrap(w.child)
      case i: InputAdapter => unwrap(i.child)
      case other => other
    }
    // Pure column selections keep the scan's attribute ids, so each wanted column is found by id.
    def ordinalsIn(scan: SparkPlan): Option[Array[Int]] = {
      val idx = df.queryExecution.executedPlan.output.map(a => scan.output.indexWhere(_.exprId == a.exprId))
      if (idx.length == types.length && idx.forall(_ >= 0)) Some(idx.toArray) else None
    }
    unwrap(df.queryExecution.executedPlan) match {
      case c: ColumnarToRowExec if unwrap(c.child).supportsColumnar =>
        val scan = unwrap(c.child)
        ordinalsIn(scan).map(o => (scan.executeColumnar(), o))
      case ProjectExec(list, c: ColumnarToRowExec) if list.forall(_.isInstanceOf[AttributeReference]) &&
          unwrap(c.child).supportsColumnar =>
        val scan = unwrap(c.child)
        ordinalsIn(scan).map(o => (scan.executeColumnar(), o))
      case _ => None
    }
  }
}
